"""Which request fields reach an engine: the one policy of `/v1/*` and `/api/chat`.

An engine interprets more of a body than OpenAI's fields. vLLM renders a `chat_template` sent
with the request (Jinja: LiteLLM's GHSA-46cm-pfwv-cgf8 is the class), hands `vllm_xargs` to its
plugins, decodes `prompt_embeds` tensors, and sends KV caches where `kv_transfer_params` says; an
OpenAI-compatible layer upstream (LiteLLM, SDK-style proxies) follows `api_base` or
`extra_headers` (LiteLLM's CVE-2024-6587). The top-level names of every body are judged once,
after their spelling is normalised (`field_key`):

1. `ROUTING_FIELDS` (where the request goes, with which credentials): refused, always; no grant
   reaches them, since the gateway alone decides where a request goes.
2. `ENGINE_CONTROL_FIELDS` (code the engine runs or loads, its internal routing and
   scheduling): refused unless an admin allows the field for the API key (`allowed_fields`) or
   for the caller's tier (`ALLOWED_FIELDS_<TIER>`).
3. `DATA_FIELDS` (OpenAI's fields and vLLM's data-only extras: sampling, structured output,
   tools, reasoning switches such as `chat_template_kwargs`): forwarded as sent.
4. Any other name is forwarded, unless its normalised spelling contains one of
   `SUSPECT_MARKERS` (`url`, `header`, `template`, `kwargs`, `secret`, ...): those are refused
   as in 2, and an admin may allow them the same way.

Why unknown names pass (4) instead of a default-deny: OpenAI adds request fields every few months
(`prediction`, `verbosity`, `prompt_cache_key`, ...) and a default-deny would break every client
that sends one, while vLLM ignores a name it does not know. What must not pass is code or a
destination, and the names that carry those say so; a new engine field of that kind is refused
until it is listed here or granted.

Spelling: names are compared as their ASCII letters and digits, lower-cased, so `API_BASE`,
`apiBase`, `api-base` and `Api.Base` are all `apibase`: a layer that maps spellings (aliases,
camelCase) cannot be reached around the lists. Variants of a data field are not data fields:
only the exact spelling is (vLLM reads no other), and a variant is judged as an unknown name.

`chat_template_kwargs` is data (template variables), but vLLM reads a `chat_template` inside it
as the template itself; that and `tokenize` are refused inside it (vLLM's own rule, kept here
for engines that lack it), `chat_template` only until it is granted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from gateway.errors import GatewayError
from gateway.settings import Settings

# The gateway alone decides where a request goes and with which credentials: never forwarded.
ROUTING_FIELDS = frozenset(
    {
        "api_base",
        "api_key",
        "api_type",
        "api_version",
        "azure_ad_token",
        "azure_endpoint",
        "base_url",
        "custom_llm_provider",
        "default_headers",
        "deployment_id",
        "endpoint",
        "extra_body",
        "extra_headers",
        "extra_query",
        "headers",
        "organization",
        "proxy",
        "url",
    }
)

# Refused unless an admin allows them (per key or tier); the reason is the error's message.
ENGINE_CONTROL_FIELDS: dict[str, str] = {
    "chat_template": "a Jinja template the engine would render (code)",
    "vllm_xargs": "arguments for the engine's plugins and custom logits processors",
    "logits_processors": "Python classes the engine would import and run",
    "prompt_embeds": "serialized tensors the engine would deserialize",
    "mm_processor_kwargs": "arguments for the engine's multimodal processor code",
    "media_io_kwargs": "arguments for the engine's media loaders",
    "kv_transfer_params": "where the engine sends or fetches KV caches (engine-internal routing)",
    "ec_transfer_params": "where the engine sends or fetches encoder caches (engine-internal "
    "routing)",
    "session_id": "the engine's routing identity for a session (engine-internal routing)",
    "request_id": "the engine's identity of a request, which one caller could reuse for another's",
    "priority": "the engine's scheduling order, which the gateway decides",
}

# Data: forwarded as sent (exact spellings). OpenAI's request fields, then vLLM's extras
# (vllm/entrypoints/openai/*/protocol.py; `guided_*` are the names before `structured_outputs`).
DATA_FIELDS = frozenset(
    {
        # OpenAI: chat, completions, embeddings
        "audio",
        "best_of",
        "dimensions",
        "echo",
        "encoding_format",
        "frequency_penalty",
        "function_call",
        "functions",
        "input",
        "logit_bias",
        "logprobs",
        "max_completion_tokens",
        "max_tokens",
        "messages",
        "metadata",
        "modalities",
        "model",
        "n",
        "parallel_tool_calls",
        "prediction",
        "presence_penalty",
        "prompt",
        "prompt_cache_key",
        "prompt_cache_retention",
        "reasoning_effort",
        "response_format",
        "safety_identifier",
        "seed",
        "service_tier",
        "stop",
        "store",
        "stream",
        "stream_options",
        "suffix",
        "temperature",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "user",
        "verbosity",
        "web_search_options",
        # vLLM: sampling
        "allowed_token_ids",
        "bad_words",
        "ignore_eos",
        "include_stop_str_in_output",
        "length_penalty",
        "logprob_token_ids",
        "min_p",
        "min_tokens",
        "prompt_logprobs",
        "repetition_detection",
        "repetition_penalty",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "stop_token_ids",
        "thinking_token_budget",
        "top_k",
        "use_beam_search",
        "watermarking",
        # vLLM: structured output
        "guided_choice",
        "guided_decoding_backend",
        "guided_grammar",
        "guided_json",
        "guided_regex",
        "guided_whitespace_pattern",
        "structural_tag",
        "structured_outputs",
        # vLLM: prompt rendering (template variables, not the template)
        "add_generation_prompt",
        "add_special_tokens",
        "chat_template_kwargs",
        "continue_final_message",
        "documents",
        "include_reasoning",
        "truncate_prompt_tokens",
        "truncation_side",
        # vLLM: what the response carries
        "cache_salt",
        "mm_payload",
        "return_mm_kwargs",
        "return_prompt_text",
        "return_token_ids",
        "return_token_offsets",
        "return_tokens_as_token_ids",
        "routed_experts_prompt_start",
        "stream_interval",
        # vLLM: embeddings
        "embed_dtype",
        "endianness",
        "normalize",
        "padding",
        "use_activation",
    }
)

# An unknown name containing one of these (normalised) looks like routing, code or a secret.
SUSPECT_MARKERS = (
    "url",
    "host",
    "endpoint",
    "proxy",
    "header",
    "redirect",
    "webhook",
    "callback",
    "apibase",
    "transfer",
    "template",
    "jinja",
    "kwargs",
    "xargs",
    "processor",
    "plugin",
    "module",
    "litellm",
    "apikey",
    "accesskey",
    "secret",
    "password",
    "credential",
    "auth",
    "bearer",
    "cookie",
)

# Inside chat_template_kwargs: the template itself and the renderer's own switch (vLLM's
# `unexpected_vars`).
TEMPLATE_KWARGS_REFUSED = ("chat_template", "tokenize")
MAX_FIELD_NAME_CHARS = 64
# How much of a refused name an error repeats.
_ECHO_CHARS = 100

_SEPARATORS = re.compile(r"[^A-Za-z0-9]+")


def field_key(name: str) -> str:
    """A field name as compared: its ASCII letters and digits, lower-cased (`apiBase`,
    `API_BASE` and `api-base` are all `apibase`)."""
    return _SEPARATORS.sub("", name).lower()


_ROUTING_KEYS = frozenset(field_key(name) for name in ROUTING_FIELDS)
_CONTROL_KEYS = {field_key(name): name for name in ENGINE_CONTROL_FIELDS}
_DATA_BY_KEY = {field_key(name): name for name in DATA_FIELDS}
_TEMPLATE_KWARGS_KEYS = {field_key(name): name for name in TEMPLATE_KWARGS_REFUSED}
_HOW_TO_ALLOW = (
    "An admin can allow it for an API key (`allowed_fields` of PUT /admin/api/keys/{id}) or for "
    "a tier (ALLOWED_FIELDS_FREE, ALLOWED_FIELDS_STANDARD, ALLOWED_FIELDS_PREMIUM)."
)


def _shown(name: str) -> str:
    return name if len(name) <= _ECHO_CHARS else name[:_ECHO_CHARS] + "..."


def _forbidden(name: str, message: str) -> GatewayError:
    return GatewayError(400, message, code="forbidden_field", param=_shown(name))


def _marker_in(key: str) -> str | None:
    return next((marker for marker in SUSPECT_MARKERS if marker in key), None)


def refusal(name: str, granted: frozenset[str] = frozenset()) -> GatewayError | None:
    """The 400 for one top-level name under the policy, or None when it passes.

    `granted` holds the `field_key`s an admin allowed this caller (key and tier).
    """
    if name in DATA_FIELDS:
        return None
    key = field_key(name)
    shown = _shown(name)
    if key in _ROUTING_KEYS:
        return _forbidden(
            name,
            f"'{shown}' is not accepted: the gateway alone decides where a request goes and "
            "with which credentials, so this field is never forwarded.",
        )
    if key in granted:
        return None
    control = _CONTROL_KEYS.get(key)
    if control is not None:
        reason = ENGINE_CONTROL_FIELDS[control]
        return _forbidden(name, f"'{shown}' is not accepted: {reason}. {_HOW_TO_ALLOW}")
    marker = _marker_in(key)
    if marker is None:
        return None
    known = _DATA_BY_KEY.get(key)
    hint = f" Did you mean '{known}'?" if known is not None else ""
    return _forbidden(
        name,
        f"'{shown}' is not a field this gateway knows, and its name suggests routing, code or a "
        f"secret ('{marker}').{hint} {_HOW_TO_ALLOW}",
    )


def check_fields(body: Mapping[str, Any], grants: Iterable[str] = ()) -> None:
    """Raise the 400 `forbidden_field` GatewayError for the first name of `body` the policy
    refuses (see the module doc); `grants` are the field names an admin allowed this caller
    (read at most once, and only when the body has a name outside DATA_FIELDS)."""
    granted: frozenset[str] | None = None
    # The hot path: a request of known data fields costs one set comparison.
    if not DATA_FIELDS.issuperset(body):
        granted = frozenset(field_key(name) for name in grants)
        for name in body:
            refused = refusal(name, granted)
            if refused is not None:
                raise refused
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if granted is None:
            granted = frozenset(field_key(name) for name in grants)
        _check_template_kwargs(kwargs, granted)


def _check_template_kwargs(kwargs: object, granted: frozenset[str]) -> None:
    if not isinstance(kwargs, dict):
        raise GatewayError(
            400,
            "'chat_template_kwargs' must be an object (template variables) or null.",
            code="invalid_request",
            param="chat_template_kwargs",
        )
    for name in kwargs:
        key = field_key(name)
        refused = _TEMPLATE_KWARGS_KEYS.get(key)
        if refused is None or (refused == "chat_template" and key in granted):
            continue
        where = f"chat_template_kwargs.{_shown(name)}"
        what = "the template itself" if refused == "chat_template" else "the renderer's own switch"
        allow = f" {_HOW_TO_ALLOW} (as 'chat_template')" if refused == "chat_template" else ""
        raise GatewayError(
            400,
            f"'{where}' is not accepted: it is {what}, not a template variable.{allow}",
            code="forbidden_field",
            param=where,
        )


def check_grant(name: str) -> str:
    """A field name an admin may allow, stripped; ValueError for one that is malformed or
    never forwarded (ROUTING_FIELDS)."""
    stripped = name.strip()
    if not 0 < len(stripped) <= MAX_FIELD_NAME_CHARS or not field_key(stripped):
        raise ValueError(
            f"a field name is 1 to {MAX_FIELD_NAME_CHARS} characters with a letter or digit"
        )
    if field_key(stripped) in _ROUTING_KEYS:
        raise ValueError(
            f"'{stripped}' can never be allowed: the gateway alone decides where a request goes"
        )
    return stripped


def normalize_grants(names: Iterable[str]) -> list[str]:
    """Checked grants, each field once (by `field_key`), in the order given."""
    kept: dict[str, str] = {}
    for name in names:
        checked = check_grant(name)
        kept.setdefault(field_key(checked), checked)
    return list(kept.values())


# The setting that lists each tier's grants.
TIER_SETTINGS = {
    "free": "ALLOWED_FIELDS_FREE",
    "standard": "ALLOWED_FIELDS_STANDARD",
    "premium": "ALLOWED_FIELDS_PREMIUM",
}


def tier_grants(settings: Settings, tier: str) -> Sequence[str]:
    """The fields ALLOWED_FIELDS_<TIER> allows a tier (none for an unknown tier)."""
    name = TIER_SETTINGS.get(tier)
    if name is None:
        return ()
    grants: list[str] = getattr(settings, name)
    return grants


def check_tier_grants(settings: Settings) -> None:
    """ValueError naming the setting when ALLOWED_FIELDS_<TIER> lists a field that cannot be
    allowed (checked at startup, so a routing field is refused there, not ignored later)."""
    for name in TIER_SETTINGS.values():
        try:
            normalize_grants(getattr(settings, name))
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None


# -- the same rules, as JSON Schema (for the OpenAPI document) ----------------------------------


def _spelled(word: str) -> str:
    # An ECMA-262 pattern (JSON Schema's dialect) matching every name whose field_key contains
    # `word`: each letter in either case, anything but a letter or digit around and between.
    letters = (f"[{c.upper()}{c}]" if c.isalpha() else c for c in word)
    return "[^A-Za-z0-9]*".join(letters)


def _exactly(word: str) -> str:
    return f"^[^A-Za-z0-9]*{_spelled(word)}[^A-Za-z0-9]*$"


# A name matches REFUSED_NAME_PATTERN exactly when `refusal` refuses it for a caller without
# grants, unless it is a data field's exact spelling (tests/gateway/test_fields.py checks both).
REFUSED_NAME_PATTERN = "|".join(
    [
        *(_exactly(field_key(name)) for name in sorted(ROUTING_FIELDS)),
        *(_exactly(field_key(name)) for name in sorted(ENGINE_CONTROL_FIELDS)),
        *(_spelled(marker) for marker in SUSPECT_MARKERS),
    ]
)
ROUTING_NAME_PATTERN = "|".join(_exactly(field_key(name)) for name in sorted(ROUTING_FIELDS))
TEMPLATE_KWARGS_PATTERN = "|".join(_exactly(field_key(name)) for name in TEMPLATE_KWARGS_REFUSED)


# The document's components (gateway/openapi.py adds them), named by the bodies that use them.
REQUEST_FIELD_REF = "#/components/schemas/RequestFieldName"
GRANTABLE_FIELD_REF = "#/components/schemas/GrantableFieldName"


def field_schemas() -> dict[str, dict[str, Any]]:
    """The components REQUEST_FIELD_REF and GRANTABLE_FIELD_REF name."""
    return {
        "RequestFieldName": {
            "title": "RequestFieldName",
            "description": "A top-level field name that is not a data field's exact spelling "
            "passes unless, compared by its letters and digits in any case, it is a routing "
            "or engine-control field or contains a marker of routing, code or secrets "
            "(README: Fields the engine interprets). An admin may allow more per key or tier.",
            "type": "string",
            "not": {"pattern": REFUSED_NAME_PATTERN},
        },
        "GrantableFieldName": {
            "title": "GrantableFieldName",
            "description": "A request field an admin may allow: never a routing field "
            "(`api_base`, `extra_headers`, ... in any spelling).",
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_FIELD_NAME_CHARS,
            "pattern": "[A-Za-z0-9]",
            "not": {"pattern": ROUTING_NAME_PATTERN},
        },
    }


def field_names_schema(also: Iterable[str] = (), refused: Iterable[str] = ()) -> dict[str, Any]:
    """The `propertyNames` schema of a body under the policy, for a caller without grants:
    a data field (or one of `also`, the route's own), or a name the policy lets through;
    never one of `refused`."""
    refused = sorted(set(refused))
    allowed: dict[str, Any] = {
        "anyOf": [
            {"enum": sorted((DATA_FIELDS | set(also)) - set(refused))},
            {"$ref": REQUEST_FIELD_REF},
        ]
    }
    if not refused:
        return allowed
    return {"allOf": [{"not": {"enum": refused}}, allowed]}


TEMPLATE_KWARGS_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "object", "propertyNames": {"not": {"pattern": TEMPLATE_KWARGS_PATTERN}}},
        {"type": "null"},
    ],
    "description": "Template variables (e.g. `enable_thinking`); never the template itself.",
}


#: The largest integer every JSON client holds exactly (2^53 - 1): the bound of the integer
#: engine fields the proxy checks (seed, top_k), as /api/chat's seed.
JSON_SAFE_INTEGER = 2**53 - 1


def checked_integer_schemas(
    max_tokens: int | None = None, max_n: int | None = None
) -> dict[str, dict[str, Any]]:
    """The engine fields the proxy checks as integers (gateway/proxy/validation.py), as the
    documents state them: a schema that left them open would promise what the proxy refuses.
    The caps (MAX_TOKENS_CAP, MAX_N) are stated where the document knows them (gateway/openapi.py
    writes them into /api/chat's)."""

    def integer(low: int, high: int | None) -> dict[str, Any]:
        bounded: dict[str, Any] = {"type": "integer", "minimum": low}
        if high is not None:
            bounded["maximum"] = high
        return {"anyOf": [bounded, {"type": "null"}]}

    safe = JSON_SAFE_INTEGER
    return {
        "seed": integer(-safe, safe),
        "top_k": integer(-1, safe),
        "min_tokens": integer(0, max_tokens),
        "max_completion_tokens": integer(1, max_tokens),
        "n": integer(1, max_n),
        "best_of": integer(1, max_n),
    }
