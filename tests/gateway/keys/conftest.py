"""Fixtures of this folder: a database per test, on SQLite and on Postgres (defined in
tests/helpers/keys.py, shared with the usage tests)."""

from tests.helpers.keys import db_url, engine, sessions  # noqa: F401  (fixtures are found by name)
