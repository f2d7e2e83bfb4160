"""The emulated scheduler: which requests run, which wait, and how fast tokens come out.

A supervisor drains on ``vllm:num_requests_running``, routes on waiting counts and watches
streams end, so these numbers must be exact: a request counts as *waiting* from arrival until
it gets a slot (at most ``--max-num-seqs`` run at once; none start while the engine sleeps or
is paused) and as *running* until its last token or its abort. Tokens are paced at
``token_s`` each, independently per request.

Ways a request ends early, as with vLLM: ``abort`` (shutdown in abort mode, sleep in abort
mode, client gone) and ``error`` (the engine core died). New requests are refused once a
shutdown has begun (``cannot schedule new futures after shutdown``) or the engine is dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator

    from fleetd.sim.vllm_metrics import Metrics


class Refused(Exception):  # noqa: N818 - the HTTP layer maps it to vLLM's 500 body
    """A new request cannot be scheduled; ``message`` is vLLM's text for the reason."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class Interrupted(Exception):  # noqa: N818 - a request's fate, not a failure of ours
    """A running request was ended early; ``reason`` is ``abort`` or ``error``."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


SHUTDOWN_MESSAGE = "cannot schedule new futures after shutdown"
DEAD_MESSAGE = "EngineCore encountered an issue. See stack trace (above) for the root cause."


@dataclass(eq=False)
class Job:
    """One generation request as the scheduler sees it."""

    prompt_tokens: int
    tokens: list[str]
    finish_reason: str  # if it is not interrupted
    arrival: float = field(default_factory=time.monotonic)
    generated: int = 0
    outcome: str | None = None  # "abort" | "error" once interrupted
    interrupt: asyncio.Event = field(default_factory=asyncio.Event)


class Scheduler:
    """Admission, pacing, interruption and the per-request metrics."""

    def __init__(
        self, metrics: Metrics, *, max_num_seqs: int, token_s: float, kv_tokens: int
    ) -> None:
        self.metrics = metrics
        self.max_num_seqs = max_num_seqs
        self.token_s = token_s
        self.kv_tokens = max(1, kv_tokens)
        self.running: set[Job] = set()
        self.waiting: set[Job] = set()
        self.refusal: str | None = None  # set once shutting down or dead
        self.admit_paused = False  # sleeping or pausing: no new request starts
        self.run_paused = False  # sleep mode "keep": running requests freeze too
        self.hung = False
        self.abort_new = False  # the engine core is shutting down: new requests end at once
        self._changed = asyncio.Event()

    # -- state changes ----------------------------------------------------------------------
    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_change(self, job: Job | None = None) -> None:
        changed = self._changed
        if job is None:
            await changed.wait()
            return
        waiters = {
            asyncio.ensure_future(changed.wait()),
            asyncio.ensure_future(job.interrupt.wait()),
        }
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    def refuse_new(self, message: str) -> None:
        """From now on new requests get ``message`` (shutdown begun, engine dead)."""
        if self.refusal is None:
            self.refusal = message

    def interrupt_all(self, reason: str) -> None:
        """End every waiting and running request with ``reason``."""
        for job in [*self.waiting, *self.running]:
            self.interrupt(job, reason)

    def interrupt(self, job: Job, reason: str) -> None:
        """End one request early."""
        if job.outcome is None:
            job.outcome = reason
            job.interrupt.set()
            self._notify()

    def pause(self, *, keep: bool) -> None:
        """Stop admitting (sleep/pause); with ``keep`` also freeze running requests."""
        self.admit_paused = True
        self.run_paused = keep
        self._notify()

    def resume(self) -> None:
        """Admit and run again."""
        self.admit_paused = False
        self.run_paused = False
        self._notify()

    def hang(self) -> None:
        """Freeze everything for good (a deadlocked engine)."""
        self.hung = True
        self._notify()

    async def wait_idle(self, *, include_waiting: bool = True) -> None:
        """Until nothing runs (and, by default, nothing waits)."""
        while self.running or (include_waiting and self.waiting):
            await self._wait_change()

    def kv_usage(self) -> float:
        """Fraction of KV-cache tokens held by running requests."""
        held = sum(j.prompt_tokens + j.generated for j in self.running)
        return min(1.0, held / self.kv_tokens)

    # -- one request ------------------------------------------------------------------------
    def check_admission(self) -> None:
        """Raise Refused if new requests are not taken now."""
        if self.refusal is not None:
            raise Refused(self.refusal)

    async def generate(self, job: Job) -> AsyncGenerator[str, None]:
        """The request's tokens, paced; raises Interrupted if it is ended early."""
        self.check_admission()
        if self.abort_new:
            job.outcome = "abort"
        self.waiting.add(job)
        self._notify()
        try:
            while (
                self.admit_paused or self.hung or len(self.running) >= self.max_num_seqs
            ) and job.outcome is None:
                await self._wait_change(job)
        finally:
            self.waiting.discard(job)
        if job.outcome is not None:
            self._finish(job, None)
            raise Interrupted(job.outcome)
        scheduled = time.monotonic()
        self.metrics.observe("vllm:request_queue_time_seconds", scheduled - job.arrival)
        self.metrics.prompt_tokens += job.prompt_tokens
        self.running.add(job)
        self._notify()
        last = scheduled
        try:
            for token in job.tokens:
                await self._pace(job)
                if job.outcome is not None:
                    raise Interrupted(job.outcome)
                now = time.monotonic()
                if job.generated == 0:
                    self.metrics.observe("vllm:time_to_first_token_seconds", now - job.arrival)
                else:
                    self.metrics.observe("vllm:inter_token_latency_seconds", now - last)
                last = now
                job.generated += 1
                self.metrics.generation_tokens += 1
                yield token
        finally:
            self.running.discard(job)
            self._finish(job, scheduled)
            self._notify()

    async def _pace(self, job: Job) -> None:
        if self.token_s > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.token_s):
                    await job.interrupt.wait()
        else:
            await asyncio.sleep(0)
        while (self.run_paused or self.hung) and job.outcome is None:
            await self._wait_change(job)

    def _finish(self, job: Job, scheduled: float | None) -> None:
        if job.outcome is None and job.generated < len(job.tokens):
            job.outcome = "abort"  # the consumer went away (client disconnected)
        reason = job.outcome or job.finish_reason
        self.metrics.success[reason] = self.metrics.success.get(reason, 0.0) + 1
        self.metrics.observe("vllm:e2e_request_latency_seconds", time.monotonic() - job.arrival)
        if scheduled is not None:
            self.metrics.observe("vllm:request_prompt_tokens", job.prompt_tokens)
            self.metrics.observe("vllm:request_generation_tokens", job.generated)
