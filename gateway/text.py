"""Text that the database can store: the NUL character is refused where requests come in.

PostgreSQL text columns (and query parameters) cannot hold U+0000. Refused at the request
schema, it is the client's mistake with the field named (a 400), instead of a database error
halfway through a request; the app's database error handler (gateway.errors) is the net under
that for any path that still sends one to Postgres.

Text rules a request model applies (`NoNul`, `NotBlank`) also go into its JSON schema as
patterns, so the OpenAPI document states what the validators refuse.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema


def reject_nul(value: str) -> str:
    """`value` unchanged, or a validation error (a 400 naming the field) when it has a NUL."""
    if "\x00" in value:
        raise PydanticCustomError(
            "nul_character", "Text must not contain the NUL character (\\u0000)."
        )
    return value


# Whitespace as Python's str.isspace, JSON Schema's \s (ECMA 262) and pydantic's Rust regex all
# read it, spelled out because the three disagree (\x1c-\x1f, \x85, \ufeff) and Schemathesis
# reads \s as ASCII only: a pattern written with this class means the same everywhere.
WHITESPACE_CLASS = r"\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
# Text with something in it besides whitespace (unanchored: it searches).
NOT_BLANK_PATTERN = f"[^{WHITESPACE_CLASS}]"
_NOT_BLANK = re.compile(NOT_BLANK_PATTERN)
# Spelled with \x00, which every one of those engines reads the same way.
NO_NUL_PATTERN = r"^[^\x00]*$"


def is_blank(value: str) -> bool:
    """Whether `value` is empty or whitespace only, as NOT_BLANK_PATTERN reads whitespace."""
    return _NOT_BLANK.search(value) is None


def reject_blank(value: str) -> str:
    """`value` unchanged, or a validation error when it is empty or whitespace only."""
    if is_blank(value):
        raise PydanticCustomError("blank_text", "Text must not be empty or whitespace only.")
    return value


@dataclass(frozen=True)
class _TextRule:
    """`Annotated` marker: a check on a string that the JSON schema states as a pattern, so
    clients and fuzzers learn the rule from the document."""

    check: Callable[[str], str]
    pattern: str

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        if "pattern" in json_schema:
            # A field with a pattern already: every one must match.
            json_schema.setdefault("allOf", []).append({"pattern": self.pattern})
        else:
            json_schema["pattern"] = self.pattern
        return json_schema


NoNul = _TextRule(reject_nul, NO_NUL_PATTERN)
NotBlank = _TextRule(reject_blank, NOT_BLANK_PATTERN)
