"""The key tests' database fixtures, shared."""

from tests.gateway.keys.conftest import (  # noqa: F401  (fixtures are found by name)
    _fresh_key_cache,
    db_url,
    engine,
    pg_url,
    sessions,
)
