"""vLLM's ``/v1/audio/transcriptions``: a multipart form in, deterministic text out.

Nothing listens to the audio: its size stands for its length (16 kHz, 16-bit mono PCM, so
32,000 bytes a second) and seeds the words, so the same file always gets the same text.
As in vLLM, ``response_format`` "text" is answered with the same JSON as "json".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import HTTP

import orjson

from simulator import text
from simulator.config import SimulatorConfig
from simulator.errors import SimulatorRequestError
from simulator.protocol import resolve_model

#: Bytes of audio per second the simulator assumes.
BYTES_PER_SECOND = 32_000
#: Words per second of audio, and the most a transcription has (Whisper's 448 positions).
WORDS_PER_SECOND = 2.5
MAX_WORDS = 448


@dataclass(frozen=True, slots=True)
class Upload:
    """The form's fields (text values) and its ``file`` (name and bytes)."""

    fields: dict[str, str]
    filename: str | None
    audio: bytes | None


@dataclass(frozen=True, slots=True)
class Transcription:
    """An answer's body, the words it holds and what to log of the request."""

    body: bytes
    words: int
    summary: dict[str, object]


def parse_form(content_type: str, body: bytes) -> Upload:
    """Split a ``multipart/form-data`` body; 400 when it is not one."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise SimulatorRequestError("file: Field required (send multipart/form-data)")
    head = b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
    message = BytesParser(EmailMessage, policy=HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise SimulatorRequestError("There was an error parsing the body")
    fields: dict[str, str] = {}
    filename: str | None = None
    audio: bytes | None = None
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        if name == "file":
            filename = part.get_filename()
            audio = data
        elif isinstance(name, str):
            fields[name] = data.decode("utf-8", "replace")
    return Upload(fields, filename, audio)


def _max_tokens(fields: dict[str, str]) -> int:
    raw = fields.get("max_completion_tokens")
    if raw is None:
        return MAX_WORDS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise SimulatorRequestError("max_completion_tokens must be a positive integer")
    return value


def transcribe(config: SimulatorConfig, upload: Upload) -> Transcription:
    """The transcription of ``upload`` with vLLM's checks of the form."""
    model = resolve_model(config, upload.fields.get("model") or None)
    if upload.audio is None:
        raise SimulatorRequestError("file: Field required")
    if upload.fields.get("stream", "false").lower() in ("true", "1"):
        raise SimulatorRequestError("The simulator does not stream transcriptions.")
    response_format = upload.fields.get("response_format", "json")
    if response_format not in ("json", "text", "verbose_json", "diarized_json"):
        raise SimulatorRequestError(
            "Currently only support response_format: "
            "`text`, `json`, `verbose_json` or `diarized_json`"
        )
    if response_format != "json" and response_format != "text":
        raise SimulatorRequestError(f"Currently do not support {response_format} for {model}")
    seconds = len(upload.audio) / BYTES_PER_SECOND
    wanted = max(1, math.ceil(seconds * WORDS_PER_SECOND))
    words = min(wanted, MAX_WORDS, _max_tokens(upload.fields))
    transcript = text.render_text(text.token_ids(len(upload.audio), words))
    body = orjson.dumps(
        {"text": transcript, "usage": {"type": "duration", "seconds": math.ceil(seconds)}}
    )
    summary: dict[str, object] = {
        **upload.fields,
        "file": {"filename": upload.filename, "bytes": len(upload.audio)},
    }
    return Transcription(body, words, summary)
