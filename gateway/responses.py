"""The one JSON response class for bodies the gateway builds by hand (errors, health)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


class JSONResponse(Response):
    """JSON encoded with orjson (UTF-8, no spaces)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        """Encode the content."""
        return orjson.dumps(content)
