"""Running one generation: its timing, its injected faults and its accounting.

Every generating API (chat, completions, responses, messages) runs through
:meth:`GenerationRunner.run` with a :class:`ReplyFormat` that knows the API's bytes; the
runner owns what they share: the prefill delay, the decode pace, client disconnects, faults
firing after N tokens, the in-flight counters and the vLLM metrics.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from simulator.asgi import (
    JSON,
    SSE_HEADERS,
    Receive,
    Send,
    disconnected_within,
    exit_process,
    send_bytes,
    wait_for_disconnect,
)
from simulator.config import SimulatorConfig
from simulator.errors import SimulatedConnectionDrop
from simulator.faults import Fault, FaultKind, RequestOptions, pick_fault
from simulator.metrics import SimulatorMetrics, SimulatorStats
from simulator.protocol import ChoicePlan, GenerationPlan

logger = logging.getLogger("simulator")


class ReplyFormat(Protocol):
    """The bytes of one API's answer to one plan, streamed or whole."""

    def opening(self) -> list[bytes]:
        """Stream events before the first token (a role chunk, ``message_start``...)."""
        ...

    def token(self, choice: ChoicePlan, step: int) -> bytes:
        """The stream event carrying token ``step`` of ``choice``."""
        ...

    def choice_end(self, choice: ChoicePlan) -> list[bytes]:
        """Stream events after the last token of ``choice``."""
        ...

    def closing(self, generated: int) -> list[bytes]:
        """The last stream events (usage, the terminator), ``generated`` tokens sent."""
        ...

    def stream_error(self, message: str) -> list[bytes]:
        """The events that end a stream on an engine error."""
        ...

    def body(self) -> bytes:
        """The whole non-streamed answer."""
        ...

    def error_body(self, message: str, status: int) -> bytes:
        """A non-streamed error answer in the API's shape."""
        ...


class _Outcome(enum.Enum):
    COMPLETED = 1
    ABORTED = 2
    FAILED = 3


@dataclass(slots=True)
class _Run:
    """Book-keeping of one running generation, read when it ends."""

    outcome: _Outcome = _Outcome.FAILED
    generated: int = 0
    ttft: float | None = None


def _chunk(body: bytes) -> dict[str, object]:
    return {"type": "http.response.body", "body": body, "more_body": True}


class GenerationRunner:
    """Runs generations against one engine's settings, counters and metrics."""

    def __init__(
        self, config: SimulatorConfig, stats: SimulatorStats, metrics: SimulatorMetrics
    ) -> None:
        """Share the app's settings, counters and metrics."""
        self.config = config
        self.stats = stats
        self.metrics = metrics

    async def run(
        self,
        plan: GenerationPlan,
        reply: ReplyFormat,
        opts: RequestOptions,
        receive: Receive,
        send: Send,
    ) -> None:
        """Answer ``plan`` (streamed or not), counting it while it runs and when it ends."""
        extra = [(b"x-request-id", opts.request_id.encode("latin-1"))] if opts.request_id else None
        fault = pick_fault(self.config, opts)
        tps = (
            opts.tokens_per_second
            if opts.tokens_per_second is not None
            else self.config.tokens_per_second
        )
        first_delay = (
            opts.first_token_delay
            if opts.first_token_delay is not None
            else self.config.first_token_delay
        )
        stats = self.stats
        reserved = plan.prompt_tokens + plan.completion_tokens
        stats.running += 1
        stats.reserved_tokens += reserved
        stats.prompt_tokens_total += plan.prompt_tokens
        self.metrics.prompt_tokens.inc(plan.prompt_tokens)
        run = _Run()
        started = time.perf_counter()
        try:
            if plan.stream:
                await self._stream(plan, reply, fault, tps, first_delay, receive, send, run, extra)
            else:
                await self._complete(
                    plan, reply, fault, tps, first_delay, receive, send, run, extra
                )
        finally:
            stats.running -= 1
            stats.reserved_tokens -= reserved
            stats.generation_tokens_total += run.generated
            elapsed = time.perf_counter() - started
            ttft = None if run.ttft is None else run.ttft - started
            if run.outcome is _Outcome.COMPLETED:
                stats.completed_total += 1
                self.metrics.observe_finished(
                    [choice.finish_reason for choice in plan.choices], run.generated, ttft, elapsed
                )
            else:
                aborted = run.outcome is _Outcome.ABORTED
                if aborted:
                    stats.aborted_total += 1
                else:
                    stats.failed_total += 1
                self.metrics.observe_interrupted(aborted, run.generated, ttft, elapsed)

    async def _stream(
        self,
        plan: GenerationPlan,
        reply: ReplyFormat,
        fault: Fault | None,
        tps: float,
        first_delay: float,
        receive: Receive,
        send: Send,
        run: _Run,
        extra_headers: list[tuple[bytes, bytes]] | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        watcher = loop.create_task(wait_for_disconnect(receive))
        sent = 0
        try:
            headers = SSE_HEADERS + extra_headers if extra_headers else SSE_HEADERS
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            if first_delay > 0 and await disconnected_within(watcher, first_delay):
                run.outcome = _Outcome.ABORTED
                return
            for event in reply.opening():
                await send(_chunk(event))
            fault_at = fault.after_chunks if fault is not None else -1
            if fault_at == 0:
                await self._fire_stream_fault(fault, reply, 0, watcher, send, run)
                return
            interval = 1.0 / tps if tps > 0 else 0.0
            first_at = loop.time()
            run.ttft = time.perf_counter()
            choices = plan.choices
            token = reply.token
            for step in range(plan.steps):
                if step:
                    if interval:
                        delay = first_at + step * interval - loop.time()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    elif not step & 15:
                        await asyncio.sleep(0)
                    if watcher.done():
                        run.outcome = _Outcome.ABORTED
                        return
                for choice in choices:
                    length = choice.length
                    if step >= length:
                        continue
                    await send(
                        {
                            "type": "http.response.body",
                            "body": token(choice, step),
                            "more_body": True,
                        }
                    )
                    sent += 1
                    if sent == fault_at:
                        await self._fire_stream_fault(fault, reply, sent, watcher, send, run)
                        return
                    if step == length - 1:
                        for event in reply.choice_end(choice):
                            await send(_chunk(event))
            await self._finish(reply.closing(sent), send)
            run.outcome = _Outcome.COMPLETED
        finally:
            run.generated = sent
            watcher.cancel()

    @staticmethod
    async def _finish(events: list[bytes], send: Send) -> None:
        """Send the last events of a stream, the final one closing the body."""
        for event in events[:-1]:
            await send(_chunk(event))
        last = events[-1] if events else b""
        await send({"type": "http.response.body", "body": last, "more_body": False})

    async def _fire_stream_fault(
        self,
        fault: Fault | None,
        reply: ReplyFormat,
        sent: int,
        watcher: asyncio.Task[None],
        send: Send,
        run: _Run,
    ) -> None:
        if fault is None:
            return
        if fault.kind is FaultKind.EXIT_PROCESS:
            exit_process(f"--die-after-chunks {fault.after_chunks} reached mid-stream")
        elif fault.kind is FaultKind.DROP_CONNECTION:
            logger.info("simulator: dropping the connection after %d chunks (injected)", sent)
            run.outcome = _Outcome.FAILED
            raise SimulatedConnectionDrop(f"connection dropped after {sent} chunks (injected)")
        elif fault.kind is FaultKind.ERROR:
            logger.info("simulator: sending an error event after %d chunks (injected)", sent)
            run.outcome = _Outcome.FAILED
            message = f"Simulated engine error after {sent} chunks (injected by the simulator)."
            await self._finish(reply.stream_error(message), send)
        else:
            logger.info("simulator: stalling after %d chunks until the client leaves", sent)
            await watcher
            run.outcome = _Outcome.ABORTED

    async def _complete(
        self,
        plan: GenerationPlan,
        reply: ReplyFormat,
        fault: Fault | None,
        tps: float,
        first_delay: float,
        receive: Receive,
        send: Send,
        run: _Run,
        extra_headers: list[tuple[bytes, bytes]] | None,
    ) -> None:
        total = plan.completion_tokens
        fires = fault is not None and fault.after_chunks <= total
        n = max(len(plan.choices), 1)
        steps = -(-fault.after_chunks // n) if fault is not None and fires else plan.steps
        delay = first_delay + (max(steps - 1, 0) / tps if tps > 0 else 0.0)
        watcher: asyncio.Task[None] | None = None
        try:
            if delay > 0 or (fires and fault is not None and fault.kind is FaultKind.STALL):
                watcher = asyncio.get_running_loop().create_task(wait_for_disconnect(receive))
                if first_delay > 0 and await disconnected_within(watcher, first_delay):
                    run.outcome = _Outcome.ABORTED
                    return
                run.ttft = time.perf_counter()
                if delay > first_delay and await disconnected_within(watcher, delay - first_delay):
                    run.outcome = _Outcome.ABORTED
                    return
            else:
                run.ttft = time.perf_counter()
            body = reply.body()
            if fires and fault is not None:
                run.generated = fault.after_chunks
                if fault.kind is FaultKind.EXIT_PROCESS:
                    exit_process(f"--die-after-chunks {fault.after_chunks} reached mid-request")
                elif fault.kind is FaultKind.DROP_CONNECTION:
                    run.outcome = _Outcome.FAILED
                    headers = [(b"content-type", JSON), (b"content-length", b"%d" % len(body))]
                    if extra_headers:
                        headers.extend(extra_headers)
                    await send({"type": "http.response.start", "status": 200, "headers": headers})
                    await send(_chunk(body[: len(body) // 2]))
                    raise SimulatedConnectionDrop("connection dropped mid-body (injected)")
                elif fault.kind is FaultKind.ERROR:
                    run.outcome = _Outcome.FAILED
                    message = (
                        f"Simulated engine error after {fault.after_chunks} tokens "
                        "(injected by the simulator)."
                    )
                    await send_bytes(
                        send, 500, reply.error_body(message, 500), extra_headers=extra_headers
                    )
                elif watcher is not None:
                    await watcher
                    run.outcome = _Outcome.ABORTED
                return
            run.generated = total
            await send_bytes(send, 200, body, extra_headers=extra_headers)
            run.outcome = _Outcome.COMPLETED
        finally:
            if watcher is not None:
                watcher.cancel()
