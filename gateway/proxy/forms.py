"""The multipart engine route, /v1/audio/transcriptions: an audio file and form fields.

The form is parsed (python-multipart, through Starlette) to find the model and check the file,
then sent on as a new form with the engine's model name; the file is held in memory, bounded by
MAX_AUDIO_BYTES like any body.
"""

from __future__ import annotations

import re

import aiohttp
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import Message

from gateway.errors import GatewayError
from gateway.proxy.upstream import RelayResponse, upstream_url
from gateway.proxy.validation import ProxyRequest, Route

MAX_FORM_FIELDS = 32
# The form field names relayed (vLLM's are such: model, language, timestamp_granularities[]...);
# a name is written into the engine's request headers, so nothing else is.
FIELD_NAME = re.compile(r"[A-Za-z0-9_.\[\]-]{1,64}")
FIELD_NAME_PATTERN = "^" + FIELD_NAME.pattern + "$"
_UNSAFE_IN_FILENAME = re.compile(r"[^A-Za-z0-9_. -]")
# What vLLM's transcription route answers in.
RESPONSE_FORMATS = ("json", "text", "verbose_json", "diarized_json")
_TEXT_FIELD_BYTES = 64 * 1024


def _bad(message: str, param: str | None) -> GatewayError:
    return GatewayError(400, message, code="invalid_request", param=param)


async def parse_transcription(request: Request, raw: bytes) -> ProxyRequest:
    """The checked transcription request from its raw multipart body."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise GatewayError(
            415,
            "Send the audio as multipart/form-data with 'file' and 'model' fields.",
            code="unsupported_media_type",
        )
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(
            max_files=1, max_fields=MAX_FORM_FIELDS, max_part_size=_TEXT_FIELD_BYTES
        )
    except HTTPException as exc:  # python-multipart's refusals (malformed, too many parts)
        raise _bad(f"The multipart body could not be read: {exc.detail}", None) from None
    try:
        return await _checked(form)
    finally:
        await form.close()  # the spooled upload, on every path


async def _checked(form: FormData) -> ProxyRequest:
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise _bad("'file' (the audio file) is required.", "file")
    fields: dict[str, str] = {}
    for name, value in form.multi_items():
        if name == "file":
            continue
        if not FIELD_NAME.fullmatch(name):
            raise _bad("Form field names are letters, digits and _ . - [ ] (at most 64).", None)
        if not isinstance(value, str):
            raise _bad(f"'{name}' must be a text field; only 'file' is a file.", name)
        fields[name] = value
    model = fields.get("model") or None
    if model is not None and len(model) > 256:
        raise _bad("'model' must be at most 256 characters.", "model")
    response_format = fields.get("response_format")
    if response_format is not None and response_format not in RESPONSE_FORMATS:
        allowed = ", ".join(RESPONSE_FORMATS)
        raise _bad(f"'response_format' must be one of {allowed}.", "response_format")
    stream = fields.get("stream", "false").lower()
    if stream not in ("true", "false"):
        raise _bad("'stream' must be true or false.", "stream")
    content = await upload.read()
    return ProxyRequest(
        route=Route.TRANSCRIPTIONS,
        body=dict(fields),
        model=model,
        stream=stream == "true",
        client_wants_usage=False,
        upload=(
            "file",
            _safe_filename(upload.filename),
            upload.content_type or "application/octet-stream",
            content,
        ),
    )


def _safe_filename(name: str | None) -> str:
    """The upload's file name as the engine is told it: printable, short, never a header."""
    cleaned = _UNSAFE_IN_FILENAME.sub("_", name or "")[:128].strip()
    return cleaned or "audio"


class FormRelay(RelayResponse):
    """Relays a multipart request as a new form with the engine's model name."""

    def _upstream(self) -> tuple[str, bytes | aiohttp.FormData]:
        form = aiohttp.FormData()
        for name, value in self._request.body.items():
            if name != "model":
                form.add_field(name, value)
        form.add_field("model", self._target.model)
        if self._request.upload is not None:
            field, filename, content_type, content = self._request.upload
            form.add_field(field, content, filename=filename, content_type=content_type)
        return upstream_url(self._target.api_base, self._request.route), form

    def _request_headers(self) -> dict[str, str]:
        # aiohttp sets the multipart content type (with its boundary) itself.
        return {"accept-encoding": "identity", **self._target.headers}
