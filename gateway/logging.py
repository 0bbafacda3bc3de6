"""One logger setup: structlog for our events, stdlib (uvicorn, alembic) routed through it."""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog
from structlog.typing import EventDict, Processor

from gateway.settings import LogFormat, Settings

# Keys whose values never reach a log line, whatever the caller passes.
_SECRET_KEYS = frozenset(
    {"password", "authorization", "api_key", "token", "access_token", "refresh_token", "secret"}
)


def _redact_secrets(_: Any, __: str, event_dict: EventDict) -> EventDict:
    for key in event_dict.keys() & _SECRET_KEYS:
        event_dict[key] = "[redacted]"
    return event_dict


def _orjson_dumps(obj: Any, **kwargs: Any) -> str:
    # structlog's documented hook: orjson renders the access line several times faster than
    # the json module (the line is written once per request).
    return orjson.dumps(obj, default=kwargs.get("default"), option=orjson.OPT_NON_STR_KEYS).decode()


class _CurrentRenderer:
    """The renderer of the latest configure_logging: loggers cache their processor chain on
    first use, so the chain holds this one object and the format is swapped inside it."""

    def __init__(self) -> None:
        self.render: Processor = structlog.processors.JSONRenderer(serializer=_orjson_dumps)

    def __call__(self, logger: Any, method: str, event: EventDict) -> Any:
        return self.render(logger, method, event)


_RENDERER = _CurrentRenderer()


def _write_to_stderr(_: Any, __: str, rendered: Any) -> Any:
    sys.stderr.write(f"{rendered}\n")
    raise structlog.DropEvent


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is at emit time (it may be replaced after setup)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        """The current standard error."""
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        """Ignore assignments: the stream is always the current stderr."""


def configure_logging(settings: Settings) -> None:
    """Configure structlog and the stdlib root logger once per process."""
    fmt = settings.LOG_FORMAT
    if fmt is LogFormat.AUTO:
        fmt = LogFormat.CONSOLE if settings.is_development else LogFormat.JSON
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact_secrets,
    ]
    renderer: Processor = (
        structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        if fmt is LogFormat.JSON
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    _RENDERER.render = renderer
    structlog.configure(
        processors=[
            # Drop filtered-out events first, before any processor spends time on them.
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            _RENDERER,
            # Our own events are written here, rendered once: handing them to the stdlib
            # handler made two LogRecords per line and cost more than the rest of the line
            # (bench/README.md). Stdlib loggers (uvicorn, alembic) still go through the handler.
            _write_to_stderr,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = _StderrHandler()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.LOG_LEVEL)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uv_logger = logging.getLogger(name)
        uv_logger.handlers.clear()
        uv_logger.propagate = True
    # Every request is logged once by our own middleware; uvicorn's access line would repeat it.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    # Even at DEBUG: these log every SQL statement with its parameters (message contents,
    # password hashes, key digests), which must never reach a log.
    for noisy in ("aiosqlite", "sqlalchemy.engine", "sqlalchemy.pool", "asyncpg"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """Return a structlog logger bound to a module name."""
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger
