"""Fault injection: the ``X-Simulator-*`` request headers and the faults they (or the
process flags) make fire mid-answer. Only with ``--test-routes`` are the headers read."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from simulator.config import SimulatorConfig
from simulator.errors import SimulatorRequestError

#: Prefix of the per-request fault-injection headers.
HEADER_PREFIX = b"x-simulator-"
HEADER_DIE = b"x-simulator-die-after-chunks"
HEADER_ERROR = b"x-simulator-error-after-chunks"
HEADER_STALL = b"x-simulator-stall-after-chunks"
HEADER_TPS = b"x-simulator-tokens-per-second"
HEADER_FIRST_TOKEN_DELAY = b"x-simulator-first-token-delay"
HEADER_STATUS = b"x-simulator-status"


class FaultKind(enum.Enum):
    """What happens when an injected fault fires."""

    EXIT_PROCESS = "exit the process"
    DROP_CONNECTION = "drop the connection"
    ERROR = "send an error event"
    STALL = "stall"


@dataclass(frozen=True, slots=True)
class Fault:
    """An injected fault and the number of content chunks sent before it fires."""

    kind: FaultKind
    after_chunks: int


@dataclass(slots=True)
class RequestOptions:
    """What the simulator reads from a request's headers."""

    authorization: bytes | None = None
    request_id: str | None = None
    drop_after: int | None = None
    error_after: int | None = None
    stall_after: int | None = None
    tokens_per_second: float | None = None
    first_token_delay: float | None = None
    force_status: int | None = None


def _header_number(name: bytes, value: bytes, integer: bool) -> float:
    try:
        number = int(value) if integer else float(value)
    except ValueError:
        number = -1
    if number < 0:
        kind = "a non-negative integer" if integer else "a non-negative number"
        raise SimulatorRequestError(f"Header {name.decode()} must be {kind}.")
    return number


def parse_request_options(
    headers: list[tuple[bytes, bytes]], *, faults: bool = False
) -> RequestOptions:
    """Read authorization, request id and, with ``faults`` (``--test-routes``), the
    ``X-Simulator-*`` headers (400 on bad values); without it those headers are ignored."""
    opts = RequestOptions()
    for name, value in headers:
        if name == b"authorization":
            opts.authorization = value
        elif name == b"x-request-id":
            opts.request_id = value.decode("latin-1")
        elif faults and name.startswith(HEADER_PREFIX):
            if name == HEADER_DIE:
                opts.drop_after = int(_header_number(name, value, True))
            elif name == HEADER_ERROR:
                opts.error_after = int(_header_number(name, value, True))
            elif name == HEADER_STALL:
                opts.stall_after = int(_header_number(name, value, True))
            elif name == HEADER_TPS:
                opts.tokens_per_second = _header_number(name, value, False)
            elif name == HEADER_FIRST_TOKEN_DELAY:
                opts.first_token_delay = _header_number(name, value, False)
            elif name == HEADER_STATUS:
                status = int(_header_number(name, value, True))
                if not 400 <= status <= 599:
                    raise SimulatorRequestError("Header x-simulator-status must be in 400..599.")
                opts.force_status = status
    return opts


def pick_fault(config: SimulatorConfig, opts: RequestOptions) -> Fault | None:
    """The fault that fires first for a request, from its headers and the process flags.

    On a tie, ending the process beats dropping the connection, which beats an
    error event, which beats a stall.
    """
    candidates = (
        (config.die_after_chunks, FaultKind.EXIT_PROCESS),
        (opts.drop_after, FaultKind.DROP_CONNECTION),
        (opts.error_after, FaultKind.ERROR),
        (config.error_after_chunks, FaultKind.ERROR),
        (opts.stall_after, FaultKind.STALL),
        (config.stall_after_chunks, FaultKind.STALL),
    )
    best: Fault | None = None
    for after, kind in candidates:
        if after is not None and (best is None or after < best.after_chunks):
            best = Fault(kind, after)
    return best
