"""The simulator's raw ASGI application: vLLM's HTTP surface, no GPU.

Requests are dispatched on path and method without any framework. Generating routes
(chat, completions, responses, messages) run through ``simulator.generation``; each API's
shapes live in a module of its own (``openai_format``, ``responses``, ``messages``,
``tokenize``, ``scoring``, ``transcription``).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

import orjson

from simulator import messages, protocol, responses, scoring, text, tokenize, transcription
from simulator.asgi import Receive, Scope, Send, exit_process, read_body, send_bytes
from simulator.config import OPTIONAL_APIS, SIMULATOR_OWNER, SIMULATOR_VERSION, SimulatorConfig
from simulator.errors import SimulatedConnectionDrop, SimulatorRequestError, error_body
from simulator.faults import RequestOptions, parse_request_options
from simulator.generation import GenerationRunner, ReplyFormat
from simulator.metrics import METRICS_CONTENT_TYPE, SimulatorMetrics, SimulatorStats
from simulator.openai_format import OpenAIReply
from simulator.sleep import SleepMode

logger = logging.getLogger("simulator")

_NOT_FOUND = b'{"detail":"Not Found"}'
_NOT_ALLOWED = b'{"detail":"Method Not Allowed"}'
_UNAUTHORIZED = b'{"error":"Unauthorized"}'
# With an API key, what needs it: vLLM's /v1/* and /v2/* (its /health, /metrics, /tokenize,
# /rerank, /score ... stay open, as in vLLM), and the simulator's own test routes, which show
# recent request bodies and reset counters.
# The sleep contract too: vLLM leaves it open (it serves it only in its dev mode), but whoever
# can reach the port could put the engine to sleep, and every user would get 503 until it wakes.
_GUARDED_PREFIXES = (
    "/v1",
    "/v2",
    "/simulator/",
    "/sleep",
    "/wake_up",
    "/is_sleeping",
    "/collective_rpc",
)
_RESPONSES_PREFIX = "/v1/responses/"

Handler = Callable[[Scope, Receive, Send, RequestOptions], Awaitable[None]]
#: Encodes a refusal in the shape of the route's API.
ErrorEncoder = Callable[[SimulatorRequestError], bytes]


def _openai_error(exc: SimulatorRequestError) -> bytes:
    return exc.body()


def _anthropic_error(exc: SimulatorRequestError) -> bytes:
    return exc.anthropic_body()


def _content_type(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return bytes(value).decode("latin-1")
    return ""


class SimulatorApp:
    """The ASGI callable: ``await app(scope, receive, send)``."""

    def __init__(self, config: SimulatorConfig) -> None:
        """Build the app, its metrics registry and its counters."""
        self.config = config
        self.stats = SimulatorStats()
        # The last request bodies and their paths, for tests that check what a client sent
        # and where (GET /simulator/requests); bounded, cleared by /simulator/reset. Only with
        # --test-routes: otherwise they are other users' prompts, and nothing keeps them.
        self.recent_requests: collections.deque[object] | None = (
            collections.deque(maxlen=64) if config.test_routes else None
        )
        self.recent_paths: collections.deque[str] | None = (
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
        self.runner = GenerationRunner(config, self.stats, self.metrics)
        self._auth = b"Bearer " + config.api_key.encode() if config.api_key else None
        self._models_body = self._build_models_body()
        self._routes: dict[str, dict[str, Handler]] = {
            "/v1/chat/completions": {"POST": self._chat},
            "/v1/completions": {"POST": self._completions},
            "/v1/embeddings": {"POST": self._embeddings},
            "/v1/responses": {"POST": self._responses},
            "/v1/messages": {"POST": self._messages},
            "/v1/messages/count_tokens": {"POST": self._count_tokens},
            "/tokenize": {"POST": self._tokenize},
            "/detokenize": {"POST": self._detokenize},
            "/rerank": {"POST": self._rerank},
            "/v1/rerank": {"POST": self._rerank},
            "/v2/rerank": {"POST": self._rerank},
            "/score": {"POST": self._score},
            "/v1/score": {"POST": self._score},
            "/v1/audio/transcriptions": {"POST": self._transcriptions},
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
        for api in config.without_apis:
            for path in OPTIONAL_APIS[api]:
                del self._routes[path]
        self._stored_responses = "responses" not in config.without_apis
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
                        crash_after, exit_process, f"--die-after-seconds {crash_after:g} elapsed"
                    )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _route(self, path: str) -> dict[str, Handler] | None:
        methods = self._routes.get(path)
        if methods is None and self._stored_responses and path.startswith(_RESPONSES_PREFIX):
            rest = path[len(_RESPONSES_PREFIX) :]
            if rest and "/" not in rest:
                return {"GET": self._response_lookup}
            if rest.endswith("/cancel") and rest.count("/") == 1:
                return {"POST": self._response_lookup}
        return methods

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
        methods = self._route(path)
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

    # --- admission ------------------------------------------------------------------------

    def _record(self, scope: Scope, body: object) -> None:
        """Keep a request's body and path for ``/simulator/requests`` (test routes only)."""
        if self.recent_requests is not None and self.recent_paths is not None:
            self.recent_requests.append(body)
            self.recent_paths.append(scope["path"])

    async def _read(
        self, scope: Scope, receive: Receive, send: Send, opts: RequestOptions, encode: ErrorEncoder
    ) -> bytes | None:
        """Count the request and read its body; answer and return ``None`` when it is refused
        (client gone, engine asleep, a forced status)."""
        self.stats.requests_total += 1
        self.stats.count_path(scope["path"])
        try:
            body = await read_body(receive)
            if body is None:
                self.stats.aborted_total += 1
                return None
            refusal = self.sleep.refusal()
            if refusal is not None:
                raise SimulatorRequestError(refusal, 503)
            if opts.force_status is not None:
                self.stats.failed_total += 1
                status = opts.force_status
                forced = SimulatorRequestError(
                    f"Simulated failure forced by x-simulator-status: {status}.", status
                )
                await send_bytes(send, status, encode(forced))
                return None
            return body
        except SimulatorRequestError as exc:
            self.stats.rejected_total += 1
            await send_bytes(send, exc.status, encode(exc))
            return None

    async def _admit(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        opts: RequestOptions,
        encode: ErrorEncoder = _openai_error,
        decode: Callable[[bytes], object] = orjson.loads,
    ) -> object | None:
        """Read and decode a JSON body; answer and return ``None`` when it is refused."""
        body = await self._read(scope, receive, send, opts, encode)
        if body is None:
            return None
        try:
            decoded: object = decode(body)
        except ValueError as exc:
            self.stats.rejected_total += 1
            refused = SimulatorRequestError(f"JSON decode error: {exc}")
            await send_bytes(send, refused.status, encode(refused))
            return None
        self._record(scope, decoded)
        return decoded

    async def _refuse(self, send: Send, exc: SimulatorRequestError, encode: ErrorEncoder) -> None:
        self.stats.rejected_total += 1
        await send_bytes(send, exc.status, encode(exc))

    def _finish_pooling(self, prompt_tokens: int, started: float) -> None:
        """Count a request answered without decoding (embeddings, scores)."""
        self.stats.prompt_tokens_total += prompt_tokens
        self.stats.completed_total += 1
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.observe_finished(["stop"], 0, None, time.perf_counter() - started)

    def _request_id(self, opts: RequestOptions) -> str:
        return opts.request_id or uuid.uuid4().hex

    # --- generation -----------------------------------------------------------------------

    async def _chat(self, scope: Scope, receive: Receive, send: Send, opts: RequestOptions) -> None:
        await self._openai(scope, receive, send, opts, protocol.parse_chat, "chatcmpl-")

    async def _completions(
        self, scope: Scope, receive: Receive, send: Send, opts: RequestOptions
    ) -> None:
        await self._openai(scope, receive, send, opts, protocol.parse_completion, "cmpl-")

    async def _openai(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        opts: RequestOptions,
        parse: Callable[[SimulatorConfig, object], protocol.GenerationPlan],
        id_prefix: str,
    ) -> None:
        raw = await self._admit(scope, receive, send, opts)
        if raw is None:
            return
        try:
            plan = parse(self.config, raw)
        except SimulatorRequestError as exc:
            await self._refuse(send, exc, _openai_error)
            return
        reply = OpenAIReply(plan, id_prefix + self._request_id(opts), int(time.time()))
        await self.runner.run(plan, reply, opts, receive, send)

    async def _responses(
        self, scope: Scope, receive: Receive, send: Send, opts: RequestOptions
    ) -> None:
        raw = await self._admit(scope, receive, send, opts)
        if raw is None:
            return
        try:
            plan, echo = responses.parse_responses(self.config, raw)
        except SimulatorRequestError as exc:
            await self._refuse(send, exc, _openai_error)
            return
        reply: ReplyFormat = responses.ResponsesReply(plan, "resp_" + self._request_id(opts), echo)
        await self.runner.run(plan, reply, opts, receive, send)

    async def _response_lookup(
        self, scope: Scope, receive: Receive, send: Send, opts: RequestOptions
    ) -> None:
        """``GET /v1/responses/{id}`` and ``POST .../cancel``: vLLM without its store keeps
        no response, so every id is unknown."""
        if await self._read(scope, receive, send, opts, _openai_error) is None:
            return
        response_id = scope["path"][len(_RESPONSES_PREFIX) :].removesuffix("/cancel")
        await self._refuse(send, responses.not_found(response_id), _openai_error)

    async def _messages(
        self, scope: Scope, receive: Receive, send: Send, opts: RequestOptions
    ) -> None:
        raw = await self._admit(scope, receive, send, opts, _anthropic_error)
        if raw is None:
            return
        try:
            plan = messages.parse_messages(self.config, raw)
        except SimulatorRequestError as exc:
            await self._refuse(send, exc, _anthropic_error)
            return
        reply = messages.MessagesReply(plan, "chatcmpl-" + self._request_id(opts))
        await self.runner.run(plan, reply, opts, receive, send)

    async def _count_tokens(
        self, scope: Scope, receive: Receive, send: Send, opts: RequestOptions
    ) -> None:
        raw = await self._admit(scope, receive, send, opts, _anthropic_error)
        if raw is None:
            return
        try:
            tokens = messages.count_input_tokens(self.config, raw)
        except SimulatorRequestError as exc:
            await self._refuse(send, exc, _anthropic_error)
            return
        self.stats.completed_total += 1
        context = {"original_input_tokens": tokens}
        await send_bytes(
            send, 200, orjson.dumps({"input_tokens": tokens, "context_management": context})
        )

    # --- tokenizer, pooling, audio --------------------------------------------------------

    async def _tokenize(
        self, scope: Scope, receive: Receive, send: Send, opts: RequestOptions
    ) -> None:
        await self._answer(scope, receive, send, opts, tokenize.tokenize)

    async def _detokenize(
        self, scope: Scope, receive: Receive, send: Send, opts: RequestOptions
    ) -> None:
        # The standard json module: word ids may pass 2**64, which orjson reads as floats.
        await self._answer(scope, receive, send, opts, tokenize.detokenize, json.loads)

    async def _answer(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        opts: RequestOptions,
        build: Callable[[SimulatorConfig, object], bytes],
        decode: Callable[[bytes], object] = orjson.loads,
    ) -> None:
        """Answer a request the engine serves without running the model."""
        raw = await self._admit(scope, receive, send, opts, decode=decode)
        if raw is None:
            return
        try:
            body = build(self.config, raw)
        except SimulatorRequestError as exc:
            await self._refuse(send, exc, _openai_error)
            return
        self.stats.completed_total += 1
        await send_bytes(send, 200, body)

    async def _rerank(
        self, scope: Scope, receive: Receive, send: Send, opts: RequestOptions
    ) -> None:
        await self._scoring(scope, receive, send, opts, scoring.rerank)

    async def _score(
        self, scope: Scope, receive: Receive, send: Send, opts: RequestOptions
    ) -> None:
        await self._scoring(scope, receive, send, opts, scoring.score)

    async def _scoring(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        opts: RequestOptions,
        build: Callable[[SimulatorConfig, object, str], scoring.ScoringResult],
    ) -> None:
        raw = await self._admit(scope, receive, send, opts)
        if raw is None:
            return
        started = time.perf_counter()
        try:
            result = build(self.config, raw, "score-" + self._request_id(opts))
        except SimulatorRequestError as exc:
            await self._refuse(send, exc, _openai_error)
            return
        self._finish_pooling(result.prompt_tokens, started)
        await send_bytes(send, 200, result.body)

    async def _transcriptions(
        self, scope: Scope, receive: Receive, send: Send, opts: RequestOptions
    ) -> None:
        body = await self._read(scope, receive, send, opts, _openai_error)
        if body is None:
            return
        started = time.perf_counter()
        try:
            upload = transcription.parse_form(_content_type(scope), body)
            self._record(scope, {k: v for k, v in upload.fields.items()})
            result = transcription.transcribe(self.config, upload)
        except SimulatorRequestError as exc:
            await self._refuse(send, exc, _openai_error)
            return
        if self.recent_requests is not None:
            self.recent_requests[-1] = result.summary
        self.stats.generation_tokens_total += result.words
        self.metrics.generation_tokens.inc(result.words)
        self._finish_pooling(0, started)
        await send_bytes(send, 200, result.body)

    async def _embeddings(
        self, scope: Scope, receive: Receive, send: Send, opts: RequestOptions
    ) -> None:
        raw = await self._admit(scope, receive, send, opts)
        if raw is None:
            return
        try:
            plan = protocol.parse_embedding(self.config, raw)
        except SimulatorRequestError as exc:
            await self._refuse(send, exc, _openai_error)
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
                "id": f"embd-{self._request_id(opts)}",
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
        self._finish_pooling(plan.prompt_tokens, started)
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
            body = await read_body(receive)
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
        # "paths" pairs with "data": where each of those bodies was sent.
        recent = {"data": list(self.recent_requests or ()), "paths": list(self.recent_paths or ())}
        await send_bytes(send, 200, orjson.dumps(recent))

    async def _reset(
        self, scope: Scope, receive: Receive, send: Send, opts: RequestOptions
    ) -> None:
        if self.recent_requests is not None and self.recent_paths is not None:
            self.recent_requests.clear()
            self.recent_paths.clear()
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
