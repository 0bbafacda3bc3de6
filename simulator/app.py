"""The simulator's raw ASGI application: vLLM's OpenAI-compatible HTTP surface, no GPU.

The hot path (streamed chat and completions) avoids any framework: requests are
dispatched on path and method, SSE chunks are built by concatenating precomputed
bytes around pre-encoded tokens, and one SSE event goes out per ``send``.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import hmac
import logging
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import orjson

from simulator import protocol, text
from simulator.config import SIMULATOR_OWNER, SIMULATOR_VERSION, SimulatorConfig
from simulator.errors import (
    SimulatedConnectionDrop,
    SimulatorRequestError,
    error_body,
    sse_error_event,
)
from simulator.metrics import METRICS_CONTENT_TYPE, SimulatorMetrics, SimulatorStats
from simulator.sleep import SleepMode

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger("simulator")

#: Prefix of the per-request fault-injection headers.
HEADER_PREFIX = b"x-simulator-"
HEADER_DIE = b"x-simulator-die-after-chunks"
HEADER_ERROR = b"x-simulator-error-after-chunks"
HEADER_STALL = b"x-simulator-stall-after-chunks"
HEADER_TPS = b"x-simulator-tokens-per-second"
HEADER_FIRST_TOKEN_DELAY = b"x-simulator-first-token-delay"
HEADER_STATUS = b"x-simulator-status"

MAX_BODY_BYTES = 64 * 1024 * 1024

_JSON = b"application/json"
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8")]
_DONE = b"data: [DONE]\n\n"
_NOT_FOUND = b'{"detail":"Not Found"}'
_NOT_ALLOWED = b'{"detail":"Method Not Allowed"}'
_UNAUTHORIZED = b'{"error":"Unauthorized"}'
# With an API key, what needs it: vLLM's /v1/* (its /health, /metrics, ... stay open, as in
# vLLM), and the simulator's own test routes, which show recent request bodies and reset counters.
# The sleep contract too: vLLM leaves it open (it serves it only in its dev mode), but whoever
# can reach the port could put the engine to sleep, and every user would get 503 until it wakes.
_GUARDED_PREFIXES = ("/v1", "/simulator/", "/sleep", "/wake_up", "/is_sleeping", "/collective_rpc")


class FaultKind(enum.Enum):
    """What happens when an injected fault fires."""

    EXIT_PROCESS = "exit the process"
    DROP_CONNECTION = "drop the connection"
    ERROR = "send an error event"
    STALL = "stall"


@dataclass(frozen=True, slots=True)
class Fault:
    """An injected fault and the number of content chunks sent before it fires."""

    kind: FaultKind
    after_chunks: int


class _Outcome(enum.Enum):
    COMPLETED = 1
    ABORTED = 2
    FAILED = 3


@dataclass(slots=True)
class _Run:
    """Book-keeping of one running generation, read when it ends."""

    outcome: _Outcome = _Outcome.FAILED
    generated: int = 0
    ttft: float | None = None


@dataclass(slots=True)
class RequestOptions:
    """What the simulator reads from a request's headers."""

    authorization: bytes | None = None
    request_id: str | None = None
    drop_after: int | None = None
    error_after: int | None = None
    stall_after: int | None = None
    tokens_per_second: float | None = None
    first_token_delay: float | None = None
    force_status: int | None = None


def _header_number(name: bytes, value: bytes, integer: bool) -> float:
    try:
        number = int(value) if integer else float(value)
    except ValueError:
        number = -1
    if number < 0:
        kind = "a non-negative integer" if integer else "a non-negative number"
        raise SimulatorRequestError(f"Header {name.decode()} must be {kind}.")
    return number


def parse_request_options(
    headers: list[tuple[bytes, bytes]], *, faults: bool = False
) -> RequestOptions:
    """Read authorization, request id and, with ``faults`` (``--test-routes``), the
    ``X-Simulator-*`` headers (400 on bad values); without it those headers are ignored."""
    opts = RequestOptions()
    for name, value in headers:
        if name == b"authorization":
            opts.authorization = value
        elif name == b"x-request-id":
            opts.request_id = value.decode("latin-1")
        elif faults and name.startswith(HEADER_PREFIX):
            if name == HEADER_DIE:
                opts.drop_after = int(_header_number(name, value, True))
            elif name == HEADER_ERROR:
                opts.error_after = int(_header_number(name, value, True))
            elif name == HEADER_STALL:
                opts.stall_after = int(_header_number(name, value, True))
            elif name == HEADER_TPS:
                opts.tokens_per_second = _header_number(name, value, False)
            elif name == HEADER_FIRST_TOKEN_DELAY:
                opts.first_token_delay = _header_number(name, value, False)
            elif name == HEADER_STATUS:
                status = int(_header_number(name, value, True))
                if not 400 <= status <= 599:
                    raise SimulatorRequestError("Header x-simulator-status must be in 400..599.")
                opts.force_status = status
    return opts


def pick_fault(config: SimulatorConfig, opts: RequestOptions) -> Fault | None:
    """The fault that fires first for a request, from its headers and the process flags.

    On a tie, ending the process beats dropping the connection, which beats an
    error event, which beats a stall.
    """
    candidates = (
        (config.die_after_chunks, FaultKind.EXIT_PROCESS),
        (opts.drop_after, FaultKind.DROP_CONNECTION),
        (opts.error_after, FaultKind.ERROR),
        (config.error_after_chunks, FaultKind.ERROR),
        (opts.stall_after, FaultKind.STALL),
        (config.stall_after_chunks, FaultKind.STALL),
    )
    best: Fault | None = None
    for after, kind in candidates:
        if after is not None and (best is None or after < best.after_chunks):
            best = Fault(kind, after)
    return best


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or ``None`` when the client went away first."""
    message = await receive()
    if message["type"] != "http.request":
        return None
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    parts = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise SimulatorRequestError("Request body too large.", 413)
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


async def _wait_for_disconnect(receive: Receive) -> None:
    """Return once the client has gone away (``http.disconnect``)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _disconnected_within(watcher: asyncio.Task[None], seconds: float) -> bool:
    """Wait ``seconds``, returning early (and ``True``) if the client goes away."""
    if watcher.done():
        return True
    done, _ = await asyncio.wait((watcher,), timeout=seconds)
    return bool(done)


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes = _JSON,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Send a complete response with ``Content-Length``."""
    headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
    if extra_headers:
        headers.extend(extra_headers)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _exit_process(reason: str) -> None:
    """Die like a crashed engine: no cleanup, no response completion, exit status 1."""
    logger.error("vLLM SIMULATOR: %s; exiting the process abruptly (injected fault)", reason)
    for handler in logging.getLogger().handlers + logger.handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


class _Chunks:
    """Precomputed bytes of one streamed response's SSE events."""

    __slots__ = ("_head", "_text_field", "chat", "prefixes", "suffix")

    def __init__(self, plan: protocol.GenerationPlan, response_id: str, created: int) -> None:
        self.chat = plan.endpoint == "chat"
        obj = b"chat.completion.chunk" if self.chat else b"text_completion"
        self._head = b"".join(
            (
                b'data: {"id":"',
                response_id.encode(),
                b'","object":"',
                obj,
                b'","created":',
                b"%d" % created,
                b',"model":',
                orjson.dumps(plan.model),
                b',"choices":[',
            )
        )
        self._text_field = b',"delta":{"content":' if self.chat else b',"text":'
        self.prefixes = {
            choice.index: b'%s{"index":%d%s' % (self._head, choice.index, self._text_field)
            for choice in plan.choices
        }
        if self.chat:
            self.suffix = b'},"logprobs":null,"finish_reason":null}]}\n\n'
        else:
            self.suffix = b',"logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n'

    def role(self, index: int) -> bytes:
        """The first chat event of a choice: ``delta: {"role": "assistant", "content": ""}``."""
        return (
            b'%s{"index":%d,"delta":{"role":"assistant","content":""},' % (self._head, index)
            + b'"logprobs":null,"finish_reason":null}]}\n\n'
        )

    def finish(self, index: int, reason: str) -> bytes:
        """The event that closes a choice, carrying its ``finish_reason``."""
        body = b'"delta":{}' if self.chat else b'"text":""'
        return (
            b'%s{"index":%d,%s,"logprobs":null,"finish_reason":"%s","stop_reason":null}]}\n\n'
            % (self._head, index, body, reason.encode())
        )

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The final ``include_usage`` event: empty ``choices`` and the totals."""
        usage = orjson.dumps(
            {
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "completion_tokens": completion_tokens,
            }
        )
        return self._head + b'],"usage":' + usage + b"}\n\n"


def _completion_body(plan: protocol.GenerationPlan, response_id: str, created: int) -> bytes:
    choices: list[dict[str, object]] = []
    for choice in plan.choices:
        content = text.render_text(choice.token_ids)
        if plan.endpoint == "chat":
            choices.append(
                {
                    "index": choice.index,
                    "message": {
                        "role": "assistant",
                        "reasoning_content": None,
                        "content": content,
                        "tool_calls": [],
                    },
                    "logprobs": None,
                    "finish_reason": choice.finish_reason,
                    "stop_reason": None,
                }
            )
        else:
            choices.append(
                {
                    "index": choice.index,
                    "text": content,
                    "logprobs": None,
                    "finish_reason": choice.finish_reason,
                    "stop_reason": None,
                    "prompt_logprobs": None,
                }
            )
    completion_tokens = plan.completion_tokens
    body: dict[str, object] = {
        "id": response_id,
        "object": "chat.completion" if plan.endpoint == "chat" else "text_completion",
        "created": created,
        "model": plan.model,
        "choices": choices,
        "usage": {
            "prompt_tokens": plan.prompt_tokens,
            "total_tokens": plan.prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
            "prompt_tokens_details": None,
        },
    }
    if plan.endpoint == "chat":
        body["prompt_logprobs"] = None
    body["kv_transfer_params"] = None
    return orjson.dumps(body)


Handler = Callable[[Scope, Receive, Send, RequestOptions], Awaitable[None]]


class SimulatorApp:
    """The ASGI callable: ``await app(scope, receive, send)``."""

    def __init__(self, config: SimulatorConfig) -> None:
        """Build the app, its metrics registry and its counters."""
        self.config = config
        self.stats = SimulatorStats()
        # The last request bodies, for tests that check what a client sent (GET
        # /simulator/requests); bounded, cleared by /simulator/reset. Only with --test-routes:
        # otherwise they are other users' prompts, and nothing keeps them.
        self.recent_requests: collections.deque[object] | None = (
            collections.deque(maxlen=64) if config.test_routes else None
        )
        self.sleep = SleepMode(config)
        self.started_at = time.time()
        self.metrics = SimulatorMetrics(
            config.primary_name,
            running=lambda: float(self.stats.running),
            kv_usage=self._kv_usage,
            sleep=self.sleep,
            gpu_memory_bytes=config.gpu_memory_bytes,
        )
        self._auth = b"Bearer " + config.api_key.encode() if config.api_key else None
        self._models_body = self._build_models_body()
        self._routes: dict[str, dict[str, Handler]] = {
            "/v1/chat/completions": {"POST": self._chat},
            "/v1/completions": {"POST": self._completions},
            "/v1/embeddings": {"POST": self._embeddings},
            "/v1/models": {"GET": self._models},
            "/health": {"GET": self._health},
            "/ping": {"GET": self._health, "POST": self._health},
            "/version": {"GET": self._version},
            "/metrics": {"GET": self._metrics},
            "/sleep": {"POST": self._sleep},
            "/wake_up": {"POST": self._wake_up},
            "/is_sleeping": {"GET": self._is_sleeping},
            "/collective_rpc": {"POST": self._collective_rpc},
        }
        if config.test_routes:
            self._routes.update(
                {
                    "/simulator/stats": {"GET": self._stats},
                    "/simulator/requests": {"GET": self._recent},
                    "/simulator/reset": {"POST": self._reset},
                }
            )

    def _kv_usage(self) -> float:
        return min(1.0, self.stats.reserved_tokens / self.config.kv_capacity_tokens)

    def _build_models_body(self) -> bytes:
        created = int(self.started_at)
        data = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": SIMULATOR_OWNER,
                "root": self.config.model,
                "parent": None,
                "max_model_len": self.config.max_model_len,
                "permission": [
                    {
                        "id": f"modelperm-{uuid.uuid4().hex}",
                        "object": "model_permission",
                        "created": created,
                        "allow_create_engine": False,
                        "allow_sampling": True,
                        "allow_logprobs": True,
                        "allow_search_indices": False,
                        "allow_view": True,
                        "allow_fine_tuning": False,
                        "organization": "*",
                        "group": None,
                        "is_blocking": False,
                    }
                ],
            }
            for name in self.config.model_names
        ]
        return orjson.dumps({"object": "list", "data": data})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Dispatch one ASGI connection scope."""
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                logger.info(
                    "vLLM engine SIMULATOR ready: model %r served as %s (no GPU, no weights)",
                    self.config.model,
                    ", ".join(self.config.model_names),
                )
                crash_after = self.config.die_after_seconds
                if crash_after is not None:
                    # An engine that crashes soon after it started serving (a bad driver, a
                    # leak): what restarts and crash-loop detection are tested against.
                    asyncio.get_running_loop().call_later(
                        crash_after, _exit_process, f"--die-after-seconds {crash_after:g} elapsed"
                    )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        try:
            opts = parse_request_options(scope["headers"], faults=self.config.test_routes)
        except SimulatorRequestError as exc:
            await send_bytes(send, exc.status, exc.body())
            return
        if (
            self._auth is not None
            and path.startswith(_GUARDED_PREFIXES)
            and (
                opts.authorization is None
                or not hmac.compare_digest(opts.authorization, self._auth)
            )
        ):
            self.stats.rejected_total += 1
            await send_bytes(send, 401, _UNAUTHORIZED)
            return
        methods = self._routes.get(path)
        if methods is None:
            await send_bytes(send, 404, _NOT_FOUND)
            return
        handler = methods.get(scope["method"])
        if handler is None:
            await send_bytes(
                send,
                405,
                _NOT_ALLOWED,
                extra_headers=[
                    (b"allow", ", ".join(methods).encode()),
                ],
            )
            return
        await handler(scope, receive, send, opts)

    # --- inference -------------------------------------------------------------------------

    async def _chat(self, scope: Scope, receive: Receive, send: Send, opts: RequestOptions) -> None:
        await self._generate(receive, send, opts, protocol.parse_chat, "chatcmpl-")

    async def _completions(
        self, scope: Scope, receive: Receive, send: Send, opts: RequestOptions
    ) -> None:
        await self._generate(receive, send, opts, protocol.parse_completion, "cmpl-")

    async def _admit(self, receive: Receive, send: Send, opts: RequestOptions) -> object | None:
        """Read and decode the body; answer and return ``None`` when it is refused."""
        self.stats.requests_total += 1
        try:
            body = await _read_body(receive)
            if body is None:
                self.stats.aborted_total += 1
                return None
            refusal = self.sleep.refusal()
            if refusal is not None:
                raise SimulatorRequestError(refusal, 503)
            if opts.force_status is not None:
                self.stats.failed_total += 1
                status = opts.force_status
                await send_bytes(
                    send,
                    status,
                    error_body(
                        f"Simulated failure forced by x-simulator-status: {status}.", status
                    ),
                )
                return None
            try:
                decoded: object = orjson.loads(body)
                if self.recent_requests is not None:
                    self.recent_requests.append(decoded)
            except orjson.JSONDecodeError as exc:
                raise SimulatorRequestError(f"JSON decode error: {exc}") from exc
            return decoded
        except SimulatorRequestError as exc:
            self.stats.rejected_total += 1
            await send_bytes(send, exc.status, exc.body())
            return None

    async def _generate(
        self,
        receive: Receive,
        send: Send,
        opts: RequestOptions,
        parse: Callable[[SimulatorConfig, object], protocol.GenerationPlan],
        id_prefix: str,
    ) -> None:
        raw = await self._admit(receive, send, opts)
        if raw is None:
            return
        try:
            plan = parse(self.config, raw)
        except SimulatorRequestError as exc:
            self.stats.rejected_total += 1
            await send_bytes(send, exc.status, exc.body())
            return
        request_id = opts.request_id or uuid.uuid4().hex
        response_id = id_prefix + request_id
        extra = [(b"x-request-id", request_id.encode("latin-1"))] if opts.request_id else None
        fault = pick_fault(self.config, opts)
        tps = (
            opts.tokens_per_second
            if opts.tokens_per_second is not None
            else self.config.tokens_per_second
        )
        first_delay = (
            opts.first_token_delay
            if opts.first_token_delay is not None
            else self.config.first_token_delay
        )

        stats = self.stats
        reserved = plan.prompt_tokens + plan.completion_tokens
        stats.running += 1
        stats.reserved_tokens += reserved
        stats.prompt_tokens_total += plan.prompt_tokens
        self.metrics.prompt_tokens.inc(plan.prompt_tokens)
        run = _Run()
        started = time.perf_counter()
        try:
            if plan.stream:
                await self._stream(
                    plan, response_id, fault, tps, first_delay, receive, send, run, extra
                )
            else:
                await self._complete(
                    plan, response_id, fault, tps, first_delay, receive, send, run, extra
                )
        finally:
            stats.running -= 1
            stats.reserved_tokens -= reserved
            stats.generation_tokens_total += run.generated
            elapsed = time.perf_counter() - started
            ttft = None if run.ttft is None else run.ttft - started
            if run.outcome is _Outcome.COMPLETED:
                stats.completed_total += 1
                self.metrics.observe_finished(
                    [choice.finish_reason for choice in plan.choices], run.generated, ttft, elapsed
                )
            else:
                aborted = run.outcome is _Outcome.ABORTED
                if aborted:
                    stats.aborted_total += 1
                else:
                    stats.failed_total += 1
                self.metrics.observe_interrupted(aborted, run.generated, ttft, elapsed)

    async def _stream(
        self,
        plan: protocol.GenerationPlan,
        response_id: str,
        fault: Fault | None,
        tps: float,
        first_delay: float,
        receive: Receive,
        send: Send,
        run: _Run,
        extra_headers: list[tuple[bytes, bytes]] | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        watcher = loop.create_task(_wait_for_disconnect(receive))
        sent = 0
        try:
            headers = _SSE_HEADERS + extra_headers if extra_headers else _SSE_HEADERS
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            if first_delay > 0 and await _disconnected_within(watcher, first_delay):
                run.outcome = _Outcome.ABORTED
                return
            chunks = _Chunks(plan, response_id, int(time.time()))
            if chunks.chat:
                for choice in plan.choices:
                    await send(
                        {
                            "type": "http.response.body",
                            "body": chunks.role(choice.index),
                            "more_body": True,
                        }
                    )
            fault_at = fault.after_chunks if fault is not None else -1
            if fault_at == 0:
                await self._fire_stream_fault(fault, 0, watcher, send, run)
                return
            interval = 1.0 / tps if tps > 0 else 0.0
            first_at = loop.time()
            run.ttft = time.perf_counter()
            prefixes = chunks.prefixes
            suffix = chunks.suffix
            choices = plan.choices
            for step in range(plan.steps):
                if step:
                    if interval:
                        delay = first_at + step * interval - loop.time()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    elif not step & 15:
                        await asyncio.sleep(0)
                    if watcher.done():
                        run.outcome = _Outcome.ABORTED
                        return
                table = text.REST_JSON if step else text.FIRST_JSON
                for choice in choices:
                    ids = choice.token_ids
                    if step >= len(ids):
                        continue
                    await send(
                        {
                            "type": "http.response.body",
                            "body": b"".join((prefixes[choice.index], table[ids[step]], suffix)),
                            "more_body": True,
                        }
                    )
                    sent += 1
                    if sent == fault_at:
                        await self._fire_stream_fault(fault, sent, watcher, send, run)
                        return
                    if step == len(ids) - 1:
                        await send(
                            {
                                "type": "http.response.body",
                                "body": chunks.finish(choice.index, choice.finish_reason),
                                "more_body": True,
                            }
                        )
            if plan.include_usage:
                await send(
                    {
                        "type": "http.response.body",
                        "body": chunks.usage(plan.prompt_tokens, sent),
                        "more_body": True,
                    }
                )
            await send({"type": "http.response.body", "body": _DONE, "more_body": False})
            run.outcome = _Outcome.COMPLETED
        finally:
            run.generated = sent
            watcher.cancel()

    async def _fire_stream_fault(
        self,
        fault: Fault | None,
        sent: int,
        watcher: asyncio.Task[None],
        send: Send,
        run: _Run,
    ) -> None:
        if fault is None:
            return
        if fault.kind is FaultKind.EXIT_PROCESS:
            _exit_process(f"--die-after-chunks {fault.after_chunks} reached mid-stream")
        elif fault.kind is FaultKind.DROP_CONNECTION:
            logger.info("simulator: dropping the connection after %d chunks (injected)", sent)
            run.outcome = _Outcome.FAILED
            raise SimulatedConnectionDrop(f"connection dropped after {sent} chunks (injected)")
        elif fault.kind is FaultKind.ERROR:
            logger.info("simulator: sending an error event after %d chunks (injected)", sent)
            run.outcome = _Outcome.FAILED
            event = sse_error_event(
                f"Simulated engine error after {sent} chunks (injected by the simulator).", 500
            )
            await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": _DONE, "more_body": False})
        else:
            logger.info("simulator: stalling after %d chunks until the client leaves", sent)
            await watcher
            run.outcome = _Outcome.ABORTED

    async def _complete(
        self,
        plan: protocol.GenerationPlan,
        response_id: str,
        fault: Fault | None,
        tps: float,
        first_delay: float,
        receive: Receive,
        send: Send,
        run: _Run,
        extra_headers: list[tuple[bytes, bytes]] | None,
    ) -> None:
        total = plan.completion_tokens
        fires = fault is not None and fault.after_chunks <= total
        n = max(len(plan.choices), 1)
        steps = -(-fault.after_chunks // n) if fault is not None and fires else plan.steps
        delay = first_delay + (max(steps - 1, 0) / tps if tps > 0 else 0.0)
        watcher: asyncio.Task[None] | None = None
        try:
            if delay > 0 or (fires and fault is not None and fault.kind is FaultKind.STALL):
                watcher = asyncio.get_running_loop().create_task(_wait_for_disconnect(receive))
                if first_delay > 0 and await _disconnected_within(watcher, first_delay):
                    run.outcome = _Outcome.ABORTED
                    return
                run.ttft = time.perf_counter()
                if delay > first_delay and await _disconnected_within(watcher, delay - first_delay):
                    run.outcome = _Outcome.ABORTED
                    return
            else:
                run.ttft = time.perf_counter()
            body = _completion_body(plan, response_id, int(time.time()))
            if fires and fault is not None:
                run.generated = fault.after_chunks
                if fault.kind is FaultKind.EXIT_PROCESS:
                    _exit_process(f"--die-after-chunks {fault.after_chunks} reached mid-request")
                elif fault.kind is FaultKind.DROP_CONNECTION:
                    run.outcome = _Outcome.FAILED
                    headers = [(b"content-type", _JSON), (b"content-length", b"%d" % len(body))]
                    if extra_headers:
                        headers.extend(extra_headers)
                    await send({"type": "http.response.start", "status": 200, "headers": headers})
                    await send(
                        {
                            "type": "http.response.body",
                            "body": body[: len(body) // 2],
                            "more_body": True,
                        }
                    )
                    raise SimulatedConnectionDrop("connection dropped mid-body (injected)")
                elif fault.kind is FaultKind.ERROR:
                    run.outcome = _Outcome.FAILED
                    await send_bytes(
                        send,
                        500,
                        error_body(
                            f"Simulated engine error after {fault.after_chunks} tokens "
                            "(injected by the simulator).",
                            500,
                        ),
                        extra_headers=extra_headers,
                    )
                elif watcher is not None:
                    await watcher
                    run.outcome = _Outcome.ABORTED
                return
            run.generated = total
            await send_bytes(send, 200, body, extra_headers=extra_headers)
            run.outcome = _Outcome.COMPLETED
        finally:
            if watcher is not None:
                watcher.cancel()

    async def _embeddings(
        self, scope: Scope, receive: Receive, send: Send, opts: RequestOptions
    ) -> None:
        raw = await self._admit(receive, send, opts)
        if raw is None:
            return
        try:
            plan = protocol.parse_embedding(self.config, raw)
        except SimulatorRequestError as exc:
            self.stats.rejected_total += 1
            await send_bytes(send, exc.status, exc.body())
            return
        started = time.perf_counter()
        data: list[dict[str, object]] = []
        for index, item in enumerate(plan.inputs):
            vector = text.embedding_vector(item, self.config.embedding_dim)
            if plan.dimensions is not None:
                vector = text.truncate_normalized(vector, plan.dimensions)
            embedding: object = (
                vector if plan.encoding_format == "float" else text.encode_base64(vector)
            )
            data.append({"index": index, "object": "embedding", "embedding": embedding})
        body = orjson.dumps(
            {
                "id": f"embd-{opts.request_id or uuid.uuid4().hex}",
                "object": "list",
                "created": int(time.time()),
                "model": plan.model,
                "data": data,
                "usage": {
                    "prompt_tokens": plan.prompt_tokens,
                    "total_tokens": plan.prompt_tokens,
                    "completion_tokens": 0,
                    "prompt_tokens_details": None,
                },
            }
        )
        self.stats.prompt_tokens_total += plan.prompt_tokens
        self.stats.completed_total += 1
        self.metrics.prompt_tokens.inc(plan.prompt_tokens)
        self.metrics.observe_finished(["stop"], 0, None, time.perf_counter() - started)
        await send_bytes(send, 200, body)

    # --- everything else -------------------------------------------------------------------

    async def _models(
        self, scope: Scope, receive: Receive, send: Send, opts: RequestOptions
    ) -> None:
        await send_bytes(send, 200, self._models_body)

    async def _health(
        self, scope: Scope, receive: Receive, send: Send, opts: RequestOptions
    ) -> None:
        await send_bytes(send, 200, b'{"status":"ok","simulator":true}')

    async def _version(
        self, scope: Scope, receive: Receive, send: Send, opts: RequestOptions
    ) -> None:
        await send_bytes(send, 200, orjson.dumps({"version": SIMULATOR_VERSION, "simulator": True}))

    async def _metrics(
        self, scope: Scope, receive: Receive, send: Send, opts: RequestOptions
    ) -> None:
        await send_bytes(send, 200, self.metrics.render(), METRICS_CONTENT_TYPE.encode())

    async def _sleep(
        self, scope: Scope, receive: Receive, send: Send, opts: RequestOptions
    ) -> None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        level = query.get("level", ["1"])[-1]
        if level not in ("1", "2"):
            await send_bytes(send, 400, error_body(f"level must be 1 or 2, got {level!r}.", 400))
            return
        if self.config.fail_sleep:
            await send_bytes(send, 500, error_body("Sleep failed (simulated: --fail-sleep).", 500))
            return
        started = time.perf_counter()
        await self.sleep.sleep(int(level), running=self.stats.running)
        self.metrics.sleep_operations.labels("sleep").observe(time.perf_counter() - started)
        # vLLM's answer (vllm/entrypoints/serve/dev/sleep/api_router.py).
        await send_bytes(send, 200, orjson.dumps({"status": "sleeping", "level": int(level)}))

    async def _wake_up(
        self, scope: Scope, receive: Receive, send: Send, opts: RequestOptions
    ) -> None:
        # Repeated, as vLLM reads them: ?tags=weights&tags=kv_cache; none wakes everything.
        tags = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("tags", [])
        if self.config.fail_wake:
            await send_bytes(send, 500, error_body("Wake failed (simulated: --fail-wake).", 500))
            return
        started = time.perf_counter()
        try:
            awake = await self.sleep.wake_up(tags)
        except SimulatorRequestError as exc:
            await send_bytes(send, exc.status, exc.body())
            return
        self.metrics.sleep_operations.labels("wake").observe(time.perf_counter() - started)
        status = "awake" if awake else "sleeping"
        await send_bytes(send, 200, orjson.dumps({"status": status, "tags": tags or None}))

    async def _is_sleeping(
        self, scope: Scope, receive: Receive, send: Send, opts: RequestOptions
    ) -> None:
        await send_bytes(send, 200, orjson.dumps({"is_sleeping": self.sleep.is_sleeping}))

    async def _collective_rpc(
        self, scope: Scope, receive: Receive, send: Send, opts: RequestOptions
    ) -> None:
        """vLLM's ``POST /collective_rpc`` (dev mode) for the one method a level-2 wake needs."""
        try:
            body = await _read_body(receive)
            if body is None:
                return
            try:
                request: object = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise SimulatorRequestError(f"JSON decode error: {exc}") from exc
            if not isinstance(request, dict):
                raise SimulatorRequestError("Request body must be a JSON object")
            method = request.get("method")
            if method is None:
                raise SimulatorRequestError("Missing 'method' in request body")
            if not isinstance(method, str):
                raise SimulatorRequestError("'method' must be a string")
            await self.sleep.collective_rpc(method)
        except SimulatorRequestError as exc:
            await send_bytes(send, exc.status, exc.body())
            return
        # One result per worker; reload_weights returns none (vllm/entrypoints/serve/dev/rpc).
        await send_bytes(send, 200, orjson.dumps({"results": [None]}))

    def stats_snapshot(self) -> dict[str, object]:
        """What ``GET /simulator/stats`` returns."""
        return {
            "simulator": True,
            "model": self.config.model,
            "served_model_names": list(self.config.model_names),
            **self.stats.as_dict(),
            "is_sleeping": self.sleep.is_sleeping,
            "sleep_level": self.sleep.level,
            "sleeping_tags": sorted(self.sleep.asleep),
            "weights_discarded": self.sleep.weights_discarded,
            "sleeps_while_running": self.sleep.sleeps_while_running,
            "gpu_memory_allocated_bytes": self.sleep.allocated_bytes,
            "gpu_memory_freed_by_sleep_bytes": self.sleep.freed_bytes,
        }

    async def _stats(
        self, scope: Scope, receive: Receive, send: Send, opts: RequestOptions
    ) -> None:
        await send_bytes(send, 200, orjson.dumps(self.stats_snapshot()))

    async def _recent(
        self, scope: Scope, receive: Receive, send: Send, opts: RequestOptions
    ) -> None:
        await send_bytes(send, 200, orjson.dumps({"data": list(self.recent_requests or ())}))

    async def _reset(
        self, scope: Scope, receive: Receive, send: Send, opts: RequestOptions
    ) -> None:
        if self.recent_requests is not None:
            self.recent_requests.clear()
        self.stats.reset()
        await send_bytes(send, 200, orjson.dumps(self.stats_snapshot()))


class _DropFilter(logging.Filter):
    """Keeps uvicorn from printing a traceback for deliberate connection drops."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Reject records whose exception is a :class:`SimulatedConnectionDrop`."""
        exc_info = record.exc_info
        return not (exc_info and isinstance(exc_info[1], SimulatedConnectionDrop))


def install_log_filter() -> None:
    """Silence uvicorn's "Exception in ASGI application" for injected drops (idempotent)."""
    uvicorn_error = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DropFilter) for f in uvicorn_error.filters):
        uvicorn_error.addFilter(_DropFilter())


def create_simulator_app(config: SimulatorConfig) -> SimulatorApp:
    """Build the simulator's ASGI app for ``config``."""
    install_log_filter()
    return SimulatorApp(config)
