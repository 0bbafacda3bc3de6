"""The engine routes: OpenAI's /v1/chat/completions, /v1/completions, /v1/embeddings,
/v1/responses and /v1/models (and seed 004's /api/v1/* and /models for the same), Anthropic's
/v1/messages and /v1/messages/count_tokens, vLLM's /v1/rerank, /v1/score, /tokenize,
/detokenize and /v1/audio/transcriptions; and /lb/status."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from gateway.deps import PrincipalDep, get_principal
from gateway.errors import GatewayError
from gateway.proxy import service
from gateway.proxy.deps import ProxyDep, SchedulerDep, get_proxy
from gateway.proxy.forms import FIELD_NAME_PATTERN, RESPONSE_FORMATS
from gateway.proxy.upstream import RelayResponse
from gateway.proxy.validation import ANTHROPIC_ROUTES, SEED_PATHS, UPSTREAM_PATHS, Route
from gateway.routing import BodyLimit, GuardedRoute, body_limit

router = APIRouter(tags=["openai"], route_class=GuardedRoute)


_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid request (the error names the field)"},
    404: {"description": "Unknown model, or a model that is not loaded"},
    503: {"description": "No engine available in time (Retry-After)"},
}


_ANTHROPIC_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid request, in Anthropic's error envelope"},
    404: {"description": "Unknown model, or a model that is not loaded"},
    503: {"description": "No engine available in time (Retry-After)"},
}


def anthropic_credentials(request: Request) -> None:
    """Anthropic's SDKs send their key as `x-api-key`: taken as the bearer credential when no
    Authorization header came (the header wins when both did)."""
    headers: list[tuple[bytes, bytes]] = request.scope["headers"]
    names = {name for name, _ in headers}
    if b"authorization" in names or b"x-api-key" not in names:
        return
    key = next(value for name, value in headers if name == b"x-api-key")
    request.scope["headers"] = [*headers, (b"authorization", b"Bearer " + key)]
    request.__dict__.pop("_headers", None)  # a Headers view read before the change


# The body is read raw, checked by validation.py and forwarded as sent; its OpenAPI description
# (docs.py, with the configured caps) is added to the document by gateway/openapi.py. A body
# parameter would make FastAPI parse and validate it first, twice the work, and answer
# malformed JSON with its own error instead of the gateway's.


def _add_openai_route(route: Route, path: str, description: str, *, name: str) -> None:
    """Register one POST route; the engine routes differ only in what they relay."""
    anthropic = route in ANTHROPIC_ROUTES

    async def endpoint(request: Request) -> Response:
        # The hot path: one parameter, so FastAPI solves no dependency tree per request
        # (bench/proxy.py measured the tree of state/scheduler/principal at ~9% of its CPU).
        # The resources and the caller come from the same functions the dependencies use.
        state = await get_proxy(request)
        if anthropic:
            anthropic_credentials(request)
        principal = await get_principal(request)
        return await service.relay(
            state=state,
            scheduler=state.scheduler,
            route=route,
            request=request,
            principal=principal,
        )

    router.add_api_route(
        path,
        body_limit(BodyLimit.DEFAULT)(endpoint),  # read by service.relay, after the caller
        methods=["POST"],
        name=name,
        description=description,
        responses=_ANTHROPIC_RESPONSES if anthropic else _RESPONSES,
        response_class=RelayResponse,
        # RelayResponse takes no status_code argument, so FastAPI cannot infer the success
        # status for the OpenAPI document (it failed to build /openapi.json without this).
        status_code=200,
    )


_DESCRIPTIONS = {
    Route.CHAT: "Chat completion (stream or not), routed to the engine serving `model` "
    '("current" or absent: the active model).',
    Route.COMPLETIONS: "Text completion (stream or not).",
    Route.EMBEDDINGS: "Embeddings.",
    Route.RESPONSES: "OpenAI's Responses API (stream or not: the engine's named events as they "
    "come). Responses are not stored: `previous_response_id` and `background` are refused.",
    Route.MESSAGES: "Anthropic's Messages API (stream or not). Credentials in `x-api-key` or "
    "`Authorization: Bearer`; errors in Anthropic's envelope. Relayed to engines that serve it "
    "(vLLM), translated to chat completions for the others.",
    Route.COUNT_TOKENS: "Anthropic's token count of a messages request (engines that serve "
    "Anthropic's API).",
    Route.RERANK: "Rerank documents against a query (engines that serve it: vLLM with a "
    "reranking model).",
    Route.SCORE: "Score pairs of texts (vLLM with a scoring model).",
    Route.TOKENIZE: "Tokenize a prompt or chat messages with the model's tokenizer.",
    Route.DETOKENIZE: "Turn token ids back into text.",
}
for _route, _path in UPSTREAM_PATHS.items():
    if _route in _DESCRIPTIONS:  # the multipart transcription route is registered below
        _add_openai_route(_route, _path, _DESCRIPTIONS[_route], name=f"openai_{_route.value}")


@router.post(
    UPSTREAM_PATHS[Route.TRANSCRIPTIONS],
    name="openai_transcriptions",
    responses=_RESPONSES,
    response_class=RelayResponse,
    status_code=200,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "propertyNames": {"pattern": FIELD_NAME_PATTERN},
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "model": {"type": "string", "maxLength": 256},
                            "language": {"type": "string"},
                            "response_format": {
                                "type": "string",
                                "enum": list(RESPONSE_FORMATS),
                            },
                            "stream": {"type": "string", "enum": ["true", "false"]},
                        },
                    }
                }
            },
        }
    },
)
@body_limit(BodyLimit.AUDIO)
async def transcriptions(request: Request) -> Response:
    """Transcribe an audio file (multipart: `file`, `model`, ...) on an engine that serves
    it (vLLM with a speech-to-text model), up to MAX_AUDIO_BYTES."""
    state = await get_proxy(request)
    principal = await get_principal(request)
    return await service.relay_transcription(
        state=state, scheduler=state.scheduler, request=request, principal=principal
    )


_NOT_STORED = (
    "Responses are not stored on this gateway (its engines run without a response store), so "
    "none can be read, listed or cancelled; a response's whole result comes with its request."
)


async def _response_not_stored(response_id: str, _principal: PrincipalDep) -> None:
    """Stored responses: none (404 in OpenAI's error shape, after the caller is checked)."""
    raise GatewayError(404, _NOT_STORED, code="response_not_found", param="response_id")


for _method, _suffix in (
    ("GET", ""),
    ("DELETE", ""),
    ("POST", "/cancel"),
    ("GET", "/input_items"),
):
    router.add_api_route(
        f"{UPSTREAM_PATHS[Route.RESPONSES]}/{{response_id}}{_suffix}",
        _response_not_stored,
        methods=[_method],
        name=f"responses_{_method.lower()}{_suffix.replace('/', '_')}",
        responses={404: {"description": "No response is stored here"}},
        status_code=200,
        description=_NOT_STORED,
    )

for _route, _path in SEED_PATHS.items():
    _add_openai_route(
        _route,
        _path,
        f"{_DESCRIPTIONS[_route]} Seed 004's path: the same route as {UPSTREAM_PATHS[_route]}.",
        name=f"openai_{_route.value}_seed",
    )


class ModelEntry(BaseModel):
    """One model the gateway can serve (OpenAI's shape, with the fleet's fields)."""

    id: str
    object: str = "model"
    created: int
    owned_by: str = "vllm-chat-gateway"
    profile: str = Field(description="The profile in model_profiles.yml that serves it.")
    state: str = Field(
        description="ready, loading, sleeping, unloading, failed or not_loaded (loaded when "
        "a request names it, with AUTO_SWITCH, or by an administrator)."
    )
    aliases: list[str] = Field(description="Other names a request may give for this model.")
    load_s: float | None = Field(description="Its last cold load, in seconds (null: none yet).")
    wake_s: float | None = Field(description="Its last wake from sleep, in seconds.")


class ModelList(BaseModel):
    """GET /v1/models."""

    object: str = "list"
    data: list[ModelEntry]


@router.get("/v1/models", response_model=ModelList)
async def list_models(state: ProxyDep, _principal: PrincipalDep) -> ModelList:
    """The models this gateway can serve: resident, asleep, or able to fit the GPUs, each with
    its state and aliases (a model too big for this machine is not listed)."""
    return ModelList(data=[ModelEntry(**entry) for entry in service.model_entries(state=state)])


@router.get("/models", response_model=ModelList)
async def list_models_seed(state: ProxyDep, _principal: PrincipalDep) -> ModelList:
    """Seed 004's path for GET /v1/models: the same list."""
    return ModelList(data=[ModelEntry(**entry) for entry in service.model_entries(state=state)])


class LbStatus(BaseModel):
    """GET /lb/status: the seed's fields plus the queue."""

    enabled: bool
    current_requests: int
    max_queue_size: int
    local_model: str | None
    cloud_model: str | None
    local_requests: int
    cloud_requests: int
    queue_depth: int
    overflow_count: int
    predicted_wait_s: float
    engine_state: str


@router.get("/lb/status", response_model=LbStatus, tags=["load balancing"])
async def lb_status(state: ProxyDep, scheduler: SchedulerDep, _principal: PrincipalDep) -> LbStatus:
    """Load balancer state: local concurrency, queue, overflow to the cloud upstream."""
    status = state.manager.status()
    cloud = scheduler.config.cloud
    return LbStatus(
        enabled=scheduler.config.enabled,
        current_requests=scheduler.local_in_flight + scheduler.cloud_in_flight,
        max_queue_size=scheduler.config.max_local,
        local_model=status.served_model_name,
        cloud_model=cloud.default_model if cloud else None,
        local_requests=scheduler.local_in_flight,
        cloud_requests=scheduler.cloud_in_flight,
        queue_depth=scheduler.queue_depth,
        overflow_count=scheduler.overflow_count,
        predicted_wait_s=round(scheduler.predicted_wait_s(), 3),
        engine_state=status.state.value,
    )
