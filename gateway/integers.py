"""Integers as JSON Schema reads them: 4 and 4.0 are the same integer, "4", 4.5 and true are not.

The OpenAPI document says `"type": "integer"`, and JSON Schema counts any number with a zero
fractional part as one, so a client (or a fuzzer) may send 4.0. Pydantic's strict int refuses
it and its lax int takes "4" as well; this reads a whole number and nothing else.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError


def whole_number(value: object) -> int | None:
    """`value` as an int when it is a JSON integer (4 or 4.0); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _whole_number(value: object) -> int:
    number = whole_number(value)
    if number is None:
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return number


# Bounds go before it, so they reach the JSON schema as minimum/maximum:
# `Annotated[int, Field(ge=1), WHOLE_NUMBER]`.
WHOLE_NUMBER = BeforeValidator(_whole_number)
WholeNumber = Annotated[int, WHOLE_NUMBER]
