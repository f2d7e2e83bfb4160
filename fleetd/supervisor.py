"""One engine process under supervision: a single owner task and an explicit state machine.

``ProcessWorker`` owns its process handle and its state; nothing else changes either. Others
ask for what they want (``ensure_running``, ``ensure_stopped``, ``restart``) and read a
frozen ``WorkerStatus``. Every state change goes through ``_set_state``, which checks the
transition table and emits a ``worker.state_changed`` event with the reason.

The life of a worker, as the owner task runs it:

    STOPPED ─start─► STARTING ─healthy─► READY ─stop─► (DRAINING) ─► STOPPING ─► STOPPED
                        │                  │
                  exit / timeout      exit / hung
                        ▼                  ▼
                     BACKOFF ─delay─► STARTING ...      (K failures in a window ─► FAILED)

Starts are serialised per GPU by a lock shared with the worker's neighbours (vLLM profiles
free memory while it starts; a neighbour starting or stopping at that moment breaks it), and
the GPU's free memory is checked against the budget right before each start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import random
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import structlog

from fleetd.lifecycle import StateOwner
from fleetd.model.worker import StopReason, WorkerState, WorkerStatus
from fleetd.runtime.launcher import EngineStartError, rotate_log, stop_group

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path
    from typing import Any

    from fleetd.config import HealthSpec
    from fleetd.obs.events import EventBus
    from fleetd.runtime.clock import Clock
    from fleetd.runtime.health import ProbeResult
    from fleetd.runtime.launcher import Launcher, ProcessHandle

_log = structlog.get_logger("fleetd.supervisor")

LOG_MAX_BYTES = 64 * 1024 * 1024


class Want(enum.StrEnum):
    """What the owner of a worker asked for."""

    RUNNING = "running"
    STOPPED = "stopped"


class Checks(Protocol):
    """Engine-specific questions the supervisor asks (implemented per engine)."""

    async def ready(self) -> ProbeResult:
        """Whether the engine serves (health passes and the model is listed)."""
        ...

    async def alive(self) -> ProbeResult:
        """Whether a ready engine still answers."""
        ...

    async def idle(self) -> bool | None:
        """No requests running (for drains); None when the engine cannot tell."""
        ...


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker runs and where; fixed for the worker's life."""

    name: str
    engine: str
    models: tuple[str, ...]
    gpu_uuid: str
    gpu_index: int
    budget_mib: int
    port: int
    argv: tuple[str, ...]
    env: dict[str, str]
    log_path: Path
    health: HealthSpec
    drain_timeout_s: float = 30.0
    standby_mib: int = 0  # > 0: a warm standby, asleep once ready (keeps this much VRAM)


@dataclass(frozen=True, slots=True)
class GpuGate:
    """A GPU's start/stop lock and how to ask for its free memory."""

    lock: asyncio.Lock
    free_mib: Callable[[], Awaitable[tuple[int, str]]]  # (free MiB, who holds the rest)


class Sleeper(Protocol):
    """vLLM's sleep mode, for a warm standby."""

    async def sleep(self) -> ProbeResult:
        """Offload the weights to host RAM, drop the KV cache."""
        ...

    async def wake_up(self, *, timeout_s: float) -> ProbeResult:
        """Load the weights back and re-allocate the KV cache."""
        ...


class ProcessWorker(StateOwner):
    """Supervises one engine process. Create, then run ``run()`` in a TaskGroup."""

    def __init__(  # noqa: PLR0913 - the boundaries are injected, by name
        self,
        spec: WorkerSpec,
        *,
        checks: Checks,
        launcher: Launcher,
        clock: Clock,
        bus: EventBus,
        gate: GpuGate,
        on_spawn: Callable[[ProcessWorker, ProcessHandle], None] | None = None,
        on_exit: Callable[[ProcessWorker], None] | None = None,
        rng: random.Random | None = None,
        sleeper: Sleeper | None = None,
    ) -> None:
        super().__init__(
            spec.name, kind="worker", clock=clock, bus=bus, engine=spec.engine, gpu=spec.gpu_index
        )
        self.spec = spec
        self._checks = checks
        self._launcher = launcher
        self._gate = gate
        self._on_spawn = on_spawn
        self._on_exit = on_exit
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not crypto
        self._handle: ProcessHandle | None = None
        self._want = Want.STOPPED
        self._stop_reason = StopReason.DESIRED_REMOVED
        self._drain = False
        self._drain_timeout_s: float | None = None
        self._restart_requested = False
        self._wake = asyncio.Event()
        self._failures: deque[float] = deque()
        self._consecutive = 0
        self.restarts = 0
        self._sleeper = sleeper
        self.standby = spec.standby_mib > 0  # asleep once ready, until promoted
        self.record_key = ""  # its record in the state dir (the reconciler's bookkeeping)
        self.record_replica = 0

    # -- what others may call -------------------------------------------------------------
    @property
    def wanted(self) -> bool:
        """Whether the owner asked for this worker to run."""
        return self._want is Want.RUNNING

    @property
    def pid(self) -> int | None:
        """The engine's pid while a process exists."""
        return None if self._handle is None or self._handle.exited() else self._handle.pid

    @property
    def handle(self) -> ProcessHandle | None:
        """The process handle while one exists."""
        return self._handle

    def status(self) -> WorkerStatus:
        """A frozen view for readers."""
        return WorkerStatus(
            name=self.spec.name,
            engine=self.spec.engine,
            gpu_uuid=self.spec.gpu_uuid,
            gpu_index=self.spec.gpu_index,
            state=self._state,
            reason=self._reason,
            port=self.spec.port,
            pid=self.pid,
            restarts=self.restarts,
            since_s=self._since,
            models=self.spec.models,
            budget_mib=self.spec.budget_mib,
        )

    def ensure_running(self) -> None:
        """Ask for the engine to run (a FAILED worker is given a fresh start)."""
        self._want = Want.RUNNING
        self._wake.set()

    def ensure_stopped(
        self, reason: StopReason, *, drain: bool = True, drain_timeout_s: float | None = None
    ) -> None:
        """Ask for the engine to stop; with ``drain`` in-flight requests finish first.

        ``drain_timeout_s`` overrides the configured bound on that wait (fleetctl drain
        --timeout).
        """
        self._want = Want.STOPPED
        self._stop_reason = reason
        self._drain = drain
        self._drain_timeout_s = drain_timeout_s
        self._wake.set()

    def promote(self, name: str) -> None:
        """A failover: this standby becomes a serving replica called ``name``; wake it."""
        self.standby = False
        self.name = name
        self.spec = dataclasses.replace(self.spec, name=name)  # standby_mib: held asleep
        self._wake.set()

    def restart(self) -> None:
        """Stop (draining) and start again, as an operator's ``fleetctl restart`` asks."""
        self._restart_requested = True
        self._want = Want.RUNNING
        self._wake.set()

    def adopt(self, handle: ProcessHandle) -> None:
        """Take over a live process from an earlier fleetd before ``run()`` starts."""
        if self._state is not WorkerState.STOPPED or self._handle is not None:
            raise RuntimeError("adopt() only before the worker runs")
        self._handle = handle
        self._want = Want.RUNNING

    # -- the owner task ---------------------------------------------------------------------
    async def run(self) -> None:
        """The owner task. Runs until cancelled; engine trouble never escapes it."""
        structlog.contextvars.bind_contextvars(worker=self.spec.name, gpu=self.spec.gpu_index)
        while True:
            if self._want is Want.STOPPED and self._handle is None:
                await self._sleep_until_woken()
                continue
            if self._state is WorkerState.FAILED:
                if not self._restart_requested:
                    await self._sleep_until_woken()
                    continue
                self._restart_requested = False
                self._failures.clear()
                self._consecutive = 0
            await self._one_life()

    async def _sleep_until_woken(self, timeout_s: float | None = None) -> None:
        """Wait for a command, or ``timeout_s`` on the injected clock."""
        self._wake.clear()
        if timeout_s is None:
            await self._wake.wait()
            return
        waiter: asyncio.Future[Any] = asyncio.ensure_future(self._wake.wait())
        sleeper: asyncio.Future[Any] = asyncio.ensure_future(self._clock.sleep(timeout_s))
        try:
            await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            sleeper.cancel()

    async def _one_life(self) -> None:
        """Start (or resume an adopted process), serve until something happens, handle it."""
        started = await (self._resume() if self._handle is not None else self._start())
        if not started:
            return
        outcome = await self._serve()
        if outcome == "stop":
            await self._stop(self._stop_reason, drain=self._drain)
        elif outcome == "restart":
            self._restart_requested = False
            await self._stop(StopReason.OPERATOR, drain=True)
            self.restarts += 1

    async def _start(self) -> bool:
        """STOPPED/BACKOFF -> STARTING -> READY; False when it did not get there."""
        spec = self.spec
        async with self._gate.lock:
            if self._want is not Want.RUNNING:
                return False
            free_mib, holders = await self._gate.free_mib()
            if free_mib < spec.budget_mib:
                await self._defer(
                    f"waiting for GPU memory: needs {spec.budget_mib} MiB, "
                    f"gpu{spec.gpu_index} has {free_mib} MiB free ({holders})"
                )
                return False
            rotate_log(spec.log_path, max_bytes=LOG_MAX_BYTES)
            try:
                handle = self._launcher.spawn(spec.argv, env=spec.env, log_path=spec.log_path)
            except EngineStartError as exc:
                await self._fail_permanently(str(exc))
                return False
            self._handle = handle
            if self._on_spawn is not None:
                self._on_spawn(self, handle)
            await self._set_state(
                WorkerState.STARTING,
                f"launched pid {handle.pid} on port {spec.port}",
                pid=handle.pid,
                port=spec.port,
            )
            why_not = await self._await_ready(handle)
        if why_not is None:
            await self._set_state(WorkerState.READY, "health check passed", pid=handle.pid)
            return True
        await self._crashed(why_not)
        return False

    async def _resume(self) -> bool:
        """An adopted process: READY if it answers, else watch it finish loading (or die)."""
        handle = self._handle
        assert handle is not None
        if (await self._checks.ready()).ok:
            await self._set_state(WorkerState.READY, f"adopted running pid {handle.pid}")
            return True
        async with self._gate.lock:
            await self._set_state(WorkerState.STARTING, f"adopted pid {handle.pid}, still loading")
            why_not = await self._await_ready(handle)
        if why_not is None:
            await self._set_state(WorkerState.READY, "health check passed", pid=handle.pid)
            return True
        await self._crashed(why_not)
        return False

    async def _await_ready(self, handle: ProcessHandle) -> str | None:
        """None when healthy; otherwise why not (exit, timeout, stop requested)."""
        timeout_s = self.spec.health.start_timeout_s
        deadline = self._clock.monotonic() + timeout_s
        exit_task = asyncio.ensure_future(handle.wait())
        try:
            while True:
                if exit_task.done():
                    return f"exited with code {exit_task.result()} while starting"
                probe = await self._checks.ready()
                if probe.ok:
                    return None
                if self._want is Want.STOPPED:
                    return "stop requested while starting"
                if self._clock.monotonic() >= deadline:
                    return f"not healthy within start_timeout_s={timeout_s:g} ({probe.detail})"
                await self._race(exit_task, min(0.25, self.spec.health.probe_interval_s))
        finally:
            exit_task.cancel()

    async def _race(self, exit_task: asyncio.Future[int | None], delay_s: float) -> None:
        """Sleep ``delay_s`` unless the process exits or a command arrives first."""
        self._wake.clear()
        waiter: asyncio.Future[Any] = asyncio.ensure_future(self._wake.wait())
        sleeper: asyncio.Future[Any] = asyncio.ensure_future(self._clock.sleep(delay_s))
        pending: set[asyncio.Future[Any]] = {exit_task, waiter, sleeper}
        try:
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            sleeper.cancel()

    async def _serve(self) -> str:
        """While READY: watch for exit, hangs and commands. Returns why serving ended."""
        handle = self._handle
        assert handle is not None
        exit_task = asyncio.ensure_future(handle.wait())
        failed_probes = 0
        ready_since = self._clock.monotonic()
        try:
            while True:
                waking = await self._sleep_or_wake()
                interval = 0.25 if waking else self.spec.health.probe_interval_s
                await self._race(exit_task, interval)
                if exit_task.done():
                    await self._crashed(f"exited with code {exit_task.result()}")
                    return "crashed"
                if self._want is Want.STOPPED:
                    return "stop"
                if self._restart_requested:
                    return "restart"
                if self._clock.monotonic() - ready_since >= self.spec.health.backoff_max_s:
                    self._consecutive = 0  # stable for a while: the next crash starts small
                probe = await self._checks.alive()
                failed_probes = 0 if probe.ok else failed_probes + 1
                if failed_probes >= self.spec.health.unhealthy_after:
                    why = f"hung: {failed_probes} health probes failed in a row ({probe.detail})"
                    self._bus.emit("worker.hung", f"{self.spec.name}: {why}", worker=self.spec.name)
                    await self._stop(StopReason.UNHEALTHY, drain=False, then=WorkerState.BACKOFF)
                    await self._crashed(why)
                    return "crashed"
                rotate_log(self.spec.log_path, max_bytes=LOG_MAX_BYTES)
        finally:
            exit_task.cancel()

    async def _sleep_or_wake(self) -> bool:
        """A ready standby goes to sleep; a promoted one wakes. True while waiting to wake."""
        if self._sleeper is None:
            return False
        if self.standby and self._state is WorkerState.READY:
            async with self._gate.lock:  # its memory is released under the GPU's lock
                result = await self._sleeper.sleep()
            if result.ok:
                await self._set_state(
                    WorkerState.STANDBY,
                    f"warm standby, asleep: weights in host RAM, about "
                    f"{self.spec.standby_mib} MiB kept on gpu{self.spec.gpu_index}",
                )
            else:
                self._bus.emit(
                    "worker.standby_error",
                    f"{self.name}: could not put it to sleep ({result.detail}); it stays "
                    "loaded (check --enable-sleep-mode support), holding its full budget",
                    worker=self.name,
                )
                self._sleeper = None
            return False
        if self.standby or self._state is not WorkerState.STANDBY:
            return False
        async with self._gate.lock:
            free_mib, holders = await self._gate.free_mib()
            # what it holds asleep is already in use on the GPU: it needs the rest
            need_mib = self.spec.budget_mib - self.spec.standby_mib
            if free_mib < need_mib:
                self._reason = (
                    f"waking: waiting for GPU memory: needs {need_mib} MiB more, "
                    f"gpu{self.spec.gpu_index} has {free_mib} MiB free ({holders})"
                )
                return True
            self._bus.emit(
                "worker.waking",
                f"{self.name}: waking the standby on gpu{self.spec.gpu_index}",
                worker=self.name,
                gpu=self.spec.gpu_index,
            )
            started = self._clock.monotonic()
            result = await self._sleeper.wake_up(timeout_s=self.spec.health.start_timeout_s)
        if not result.ok:
            self._reason = f"wake-up failed ({result.detail}); retrying"
            return True
        took_s = self._clock.monotonic() - started
        await self._set_state(WorkerState.READY, f"woken from standby in {took_s:.1f} s")
        return False

    async def _stop(
        self,
        reason: StopReason,
        *,
        drain: bool,
        then: WorkerState = WorkerState.STOPPED,
    ) -> None:
        """(DRAINING ->) STOPPING -> ``then``; the process group is gone afterwards."""
        handle = self._handle
        if handle is None:
            return
        if drain and self._state is WorkerState.READY:
            await self._set_state(WorkerState.DRAINING, f"draining before stop ({reason})")
            await self._wait_idle(handle)
        async with self._gate.lock:  # memory is released under the GPU's lock
            await self._set_state(WorkerState.STOPPING, f"SIGTERM to the process group ({reason})")
            outcome = await stop_group(
                handle, grace_s=self.spec.health.stop_grace_s, clock=self._clock
            )
        self._forget_process(outcome.orphans)
        await self._set_state(
            then, f"stopped ({reason}): {outcome.describe()}", stop_reason=reason.value
        )

    def _forget_process(self, orphans: tuple[int, ...] = ()) -> None:
        if orphans:
            self._bus.emit(
                "worker.orphaned",
                f"{self.spec.name}: pids {list(orphans)} survived SIGKILL",
                worker=self.spec.name,
                pids=list(orphans),
            )
        self._handle = None
        if self._on_exit is not None:
            self._on_exit(self)

    async def _wait_idle(self, handle: ProcessHandle) -> None:
        """Wait (bounded by drain_timeout_s) until the engine runs no request, or exits."""
        bound = self._drain_timeout_s
        deadline = self._clock.monotonic() + (self.spec.drain_timeout_s if bound is None else bound)
        exit_task = asyncio.ensure_future(handle.wait())
        try:
            while self._clock.monotonic() < deadline and not exit_task.done():
                if await self._checks.idle() in (True, None):
                    return
                await self._race(exit_task, 0.2)
        finally:
            exit_task.cancel()

    async def _crashed(self, why: str) -> None:
        """Record a failure: BACKOFF with a delay, or FAILED when it crash-loops."""
        handle = self._handle
        if handle is not None:
            # whatever is left of the group (vLLM's children) must go before a restart
            outcome = await stop_group(
                handle, grace_s=min(5.0, self.spec.health.stop_grace_s), clock=self._clock
            )
            self._forget_process(outcome.orphans)
        if self._want is Want.STOPPED:
            if self._state in (WorkerState.STARTING, WorkerState.READY, WorkerState.STANDBY):
                await self._set_state(WorkerState.STOPPING, why)
            await self._set_state(WorkerState.STOPPED, why)
            return
        now = self._clock.monotonic()
        health = self.spec.health
        self._failures.append(now)
        while self._failures and now - self._failures[0] > health.restart_window_s:
            self._failures.popleft()
        if len(self._failures) >= health.max_restarts:
            await self._set_state(
                WorkerState.FAILED,
                f"{why}; {len(self._failures)} failures within {health.restart_window_s:g} s "
                "(crash loop): not restarting until an operator asks",
            )
            self._bus.emit(
                "worker.failed", f"{self.spec.name} failed: crash loop", worker=self.spec.name
            )
            return
        self._consecutive += 1
        delay = min(health.backoff_max_s, health.backoff_initial_s * 2 ** (self._consecutive - 1))
        delay *= self._rng.uniform(0.8, 1.2)
        self.restarts += 1
        self._bus.emit(
            "worker.crashed", f"{self.spec.name}: {why}", worker=self.spec.name, delay_s=delay
        )
        reason = f"{why}; restarting in {delay:.1f} s"
        if self._state is not WorkerState.BACKOFF:
            await self._set_state(WorkerState.BACKOFF, reason, delay_s=round(delay, 2))
        self._reason = reason
        # the reconciler's nudges (ensure_running) must not cut the backoff short: only a
        # stop or an operator's restart does
        deadline = self._clock.monotonic() + delay
        while (left := deadline - self._clock.monotonic()) > 0:
            await self._sleep_until_woken(left)
            if self._interrupts_backoff():
                break

    def _interrupts_backoff(self) -> bool:
        """A stop or an operator's restart ends a backoff early (a call: the flags change)."""
        return self._want is Want.STOPPED or self._restart_requested

    async def _defer(self, why: str) -> None:
        """Not a failure: wait for the reconciler's next nudge (bounded) and try again."""
        if self._state is not WorkerState.BACKOFF:
            await self._set_state(WorkerState.BACKOFF, why)
        self._reason = why
        await self._sleep_until_woken(self.spec.health.backoff_max_s)

    async def _fail_permanently(self, why: str) -> None:
        if self._state is WorkerState.STOPPED:
            await self._set_state(WorkerState.STARTING, "launching")
        await self._set_state(WorkerState.FAILED, why)
        self._bus.emit("worker.failed", f"{self.spec.name}: {why}", worker=self.spec.name)

    async def shutdown(self, *, leave_running: bool) -> None:
        """Daemon exit, after the owner task was cancelled: stop the engine, or leave it."""
        handle = self._handle
        if handle is not None and leave_running:
            close = getattr(handle, "close", None)
            if close is not None:
                close()
            self._bus.emit(
                "worker.left_running",
                f"{self.spec.name}: left running (pid {handle.pid}) for the next fleetd",
                worker=self.spec.name,
                pid=handle.pid,
            )
            return
        if handle is not None:
            if self._state in (
                WorkerState.STARTING,
                WorkerState.READY,
                WorkerState.DRAINING,
                WorkerState.STANDBY,
            ):
                await self._set_state(WorkerState.STOPPING, "fleetd is exiting")
            outcome = await stop_group(
                handle, grace_s=self.spec.health.stop_grace_s, clock=self._clock
            )
            self._forget_process(outcome.orphans)
        if self._state is not WorkerState.STOPPED:
            await self._set_state(WorkerState.STOPPED, "fleetd exited")
