"""The field policy (gateway/fields.py) on its own: lists, spellings, grants, and the document's
pattern saying exactly what the code refuses."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import GatewayError
from gateway.fields import (
    DATA_FIELDS,
    ENGINE_CONTROL_FIELDS,
    REFUSED_NAME_PATTERN,
    ROUTING_FIELDS,
    ROUTING_NAME_PATTERN,
    SUSPECT_MARKERS,
    TEMPLATE_KWARGS_PATTERN,
    check_fields,
    check_grant,
    check_tier_grants,
    field_key,
    normalize_grants,
    refusal,
    tier_grants,
)
from tests.helpers.app import make_settings

REFUSED = sorted(ROUTING_FIELDS | set(ENGINE_CONTROL_FIELDS))


def spellings(name: str) -> list[str]:
    """A field name as clients and SDK layers spell it: as is, upper case, camelCase,
    PascalCase, kebab-case, dotted."""
    words = name.split("_")
    camel = words[0] + "".join(word.title() for word in words[1:])
    return [
        name,
        name.upper(),
        camel,
        camel[:1].upper() + camel[1:],
        "-".join(words),
        ".".join(words),
        f"__{name}__",
    ]


def _refused(name: str, grants: tuple[str, ...] = ()) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        check_fields({"model": "m", name: "x"}, grants)
    return caught.value


def test_the_lists_do_not_overlap_and_no_data_field_looks_refused() -> None:
    keys = {name: field_key(name) for name in DATA_FIELDS}
    refused_keys = {field_key(name) for name in REFUSED}
    assert len(refused_keys) == len(REFUSED)
    assert not ROUTING_FIELDS & set(ENGINE_CONTROL_FIELDS)
    assert not set(keys.values()) & refused_keys
    # Data fields whose names carry a marker pass only by their exact spelling (see below).
    marked = sorted(name for name, key in keys.items() if any(m in key for m in SUSPECT_MARKERS))
    assert marked == ["chat_template_kwargs", "return_mm_kwargs"]


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("api_base", "apibase"),
        ("API_BASE", "apibase"),
        ("apiBase", "apibase"),
        ("api-base", "apibase"),
        ("Api.Base", "apibase"),
        (" api base ", "apibase"),
        # Full-width letters are not ASCII: dropped, never mapped to their ASCII look-alikes.
        ("\uff41\uff50\uff49_base", "base"),
    ],
)
def test_field_key_keeps_ascii_letters_and_digits_lower_cased(name: str, key: str) -> None:
    assert field_key(name) == key


@pytest.mark.parametrize("name", REFUSED)
def test_every_refused_field_is_refused_in_every_spelling_naming_it(name: str) -> None:
    for spelled in spellings(name):
        error = _refused(spelled)
        assert (error.status_code, error.code, error.param) == (400, "forbidden_field", spelled)
        assert spelled in error.message
        if name in ENGINE_CONTROL_FIELDS:
            # How to get it allowed: both ways an admin has.
            assert "allowed_fields" in error.message
            assert "ALLOWED_FIELDS_PREMIUM" in error.message
        else:
            assert "never forwarded" in error.message


@pytest.mark.parametrize(
    "name",
    ["callback_url", "webhookTarget", "x-api-key", "aws_secret_access_key", "tool_server_host"],
)
def test_unknown_names_that_look_like_routing_code_or_secrets_are_refused(name: str) -> None:
    error = _refused(name)
    assert error.param == name
    assert "ALLOWED_FIELDS_" in error.message


def test_a_variant_of_a_data_field_with_a_marker_is_refused_with_the_right_spelling() -> None:
    error = _refused("chatTemplateKwargs")
    assert "Did you mean 'chat_template_kwargs'?" in error.message


@pytest.mark.parametrize(
    "name", ["prediction", "verbosity", "some_new_openai_field", "topK", "x_trace_tag"]
)
def test_unknown_plain_names_pass(name: str) -> None:
    check_fields({"model": "m", name: {"any": ["data", 1]}})


def test_every_data_field_passes() -> None:
    check_fields(dict.fromkeys(DATA_FIELDS))


def test_long_names_are_echoed_shortened() -> None:
    name = "url_" + "x" * 5000
    error = _refused(name)
    assert error.param is not None
    assert len(error.param) < 120
    assert len(error.message) < 600


def test_a_grant_allows_engine_control_and_unknown_fields_in_any_spelling() -> None:
    for name in (*ENGINE_CONTROL_FIELDS, "callback_url"):
        # The grant and the request may spell it differently.
        camel = spellings(name)[2]
        check_fields({name: 1, camel: 2}, (name.upper(),))
        assert refusal(name, frozenset({field_key(name)})) is None
    # Only the granted one.
    error = _refused("vllm_xargs", ("chat_template",))
    assert error.param == "vllm_xargs"


@pytest.mark.parametrize("name", sorted(ROUTING_FIELDS))
def test_no_grant_reaches_a_routing_field(name: str) -> None:
    error = _refused(name, (name,))
    assert error.param == name
    with pytest.raises(ValueError, match="can never be allowed"):
        check_grant(spellings(name)[2])


def test_grants_are_checked_deduplicated_and_stripped() -> None:
    assert normalize_grants([" chat_template", "chatTemplate", "vllm_xargs"]) == [
        "chat_template",
        "vllm_xargs",
    ]
    for bad in ("", "   ", "__", "x" * 65):
        with pytest.raises(ValueError, match="a field name is 1 to 64 characters"):
            check_grant(bad)


@pytest.mark.parametrize("inner", ["chat_template", "chatTemplate", "tokenize", "TOKENIZE"])
def test_template_kwargs_cannot_carry_the_template(inner: str) -> None:
    with pytest.raises(GatewayError) as caught:
        check_fields({"chat_template_kwargs": {"enable_thinking": False, inner: "{{ x }}"}})
    assert caught.value.code == "forbidden_field"
    assert caught.value.param == f"chat_template_kwargs.{inner}"
    if field_key(inner) == "chattemplate":
        check_fields({"chat_template_kwargs": {inner: "{{ x }}"}}, ("chat_template",))
    else:
        # The renderer's own switch stays refused whatever is granted.
        with pytest.raises(GatewayError):
            check_fields({"chat_template_kwargs": {inner: True}}, ("chat_template", inner))


def test_template_kwargs_must_be_an_object() -> None:
    check_fields({"chat_template_kwargs": None})
    check_fields({"chat_template_kwargs": {"enable_thinking": True}})
    with pytest.raises(GatewayError) as caught:
        check_fields({"chat_template_kwargs": "{{ x }}"})
    assert (caught.value.code, caught.value.param) == ("invalid_request", "chat_template_kwargs")


def test_tier_grants_come_from_settings_and_a_routing_one_stops_startup() -> None:
    settings = make_settings(ALLOWED_FIELDS_PREMIUM="chat_template, vllm_xargs")
    assert list(tier_grants(settings, "premium")) == ["chat_template", "vllm_xargs"]
    assert list(tier_grants(settings, "standard")) == []
    assert list(tier_grants(settings, "no-such-tier")) == []
    check_tier_grants(settings)
    bad = make_settings(ALLOWED_FIELDS_FREE='["chat_template", "apiBase"]')
    with pytest.raises(ValueError, match="ALLOWED_FIELDS_FREE: 'apiBase' can never be allowed"):
        check_tier_grants(bad)


# -- the document's patterns say what the code does -----------------------------------------


def _code_refuses(name: str) -> bool:
    try:
        check_fields({name: None})
    except GatewayError:
        return True
    return False


def _schema_refuses(name: str) -> bool:
    # field_names_schema: a data field's exact spelling, or no match of the pattern.
    return name not in DATA_FIELDS and re.search(REFUSED_NAME_PATTERN, name) is not None


CORPUS = [
    *(spelled for name in REFUSED for spelled in spellings(name)),
    *(spelled for name in DATA_FIELDS for spelled in spellings(name)),
    *(spelled for marker in SUSPECT_MARKERS for spelled in (marker, f"x_{marker}_y", marker[::-1])),
    "apibases",
    "my_api_base",
    "",
    "-",
]


def test_the_pattern_refuses_exactly_what_the_code_refuses() -> None:
    assert len(CORPUS) > 500
    assert any(_code_refuses(name) for name in CORPUS)
    assert not all(_code_refuses(name) for name in CORPUS)
    disagree = [name for name in CORPUS if _schema_refuses(name) != _code_refuses(name)]
    assert disagree == []


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=24))
def test_the_pattern_agrees_with_the_code_on_any_name(name: str) -> None:
    assert _schema_refuses(name) == _code_refuses(name)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(sorted(ROUTING_FIELDS)),
    st.lists(st.sampled_from(["_", "-", ".", " ", "__"]), min_size=0, max_size=3),
    st.booleans(),
)
def test_routing_pattern_matches_every_spelling(name: str, noise: list[str], upper: bool) -> None:
    spelled = "".join(noise) + (name.upper() if upper else name) + "".join(noise)
    assert re.search(ROUTING_NAME_PATTERN, spelled)
    with pytest.raises(ValueError, match="can never be allowed"):
        check_grant(spelled)


def test_template_kwargs_pattern_matches_what_the_code_refuses() -> None:
    for inner in ("chat_template", "ChatTemplate", "tokenize", "enable_thinking", "templates"):
        refused = True
        try:
            check_fields({"chat_template_kwargs": {inner: 1}})
            refused = False
        except GatewayError:
            pass
        assert refused == (re.search(TEMPLATE_KWARGS_PATTERN, inner) is not None), inner
