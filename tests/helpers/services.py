"""Real services for integration tests (the modules beside this one): PostgreSQL, Redis,
Docker and vLLM (CPU).

Every helper starts a throwaway instance on 127.0.0.1 (free ports, temp dirs) and never touches
a system-wide service. ``ServiceUnavailable`` means a binary or venv is missing: the fixtures in
``tests/conftest.py`` turn it into a skip (or a failure under ``CI`` / ``VCG_REQUIRE_ALL=1``).
"""

from __future__ import annotations


class ServiceUnavailable(RuntimeError):
    """A real service cannot run here because something is not installed."""
