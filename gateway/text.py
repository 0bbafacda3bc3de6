"""Text that the database can store: the NUL character is refused where requests come in.

PostgreSQL text columns (and query parameters) cannot hold U+0000. Refused at the request
schema, it is the client's mistake with the field named (a 400), instead of a database error
halfway through a request; `install_text_errors` is the net under that for any path that
still sends one to Postgres.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from pydantic import AfterValidator
from pydantic_core import PydanticCustomError
from sqlalchemy.exc import DBAPIError

from gateway.db import sqlstate
from gateway.errors import error_response
from gateway.responses import JSONResponse

# SQLSTATE 22021 character_not_in_repertoire, 22P05 untranslatable_character: what Postgres
# says about a NUL in text.
_TEXT_SQLSTATES = frozenset({"22021", "22P05"})


def reject_nul(value: str) -> str:
    """`value` unchanged, or a validation error (a 400 naming the field) when it has a NUL."""
    if "\x00" in value:
        raise PydanticCustomError(
            "nul_character", "Text must not contain the NUL character (\\u0000)."
        )
    return value


NoNul = AfterValidator(reject_nul)


async def _database_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DBAPIError)
    if sqlstate(exc) in _TEXT_SQLSTATES:
        return error_response(
            400,
            "The request has text the database cannot store (the NUL character, \\u0000).",
            code="invalid_text",
        )
    raise exc


def install_text_errors(app: FastAPI) -> None:
    """Answer a text the database refused with a 400, not a 500."""
    app.add_exception_handler(DBAPIError, _database_error)
