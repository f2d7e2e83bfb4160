"""Fakes for the effect boundaries, shipped like structlog.testing.

A clock you step by hand, a launcher whose processes exit when told to, and engine checks
that answer from a script.

They stand in for the boundaries only (time, processes, HTTP probes); the supervisor and the
reconciler under test are the real ones.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fleetd.runtime.health import ProbeResult
from fleetd.runtime.launcher import EngineStartError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path


class ManualClock:
    """Monotonic time that moves only when a test calls ``advance``."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def monotonic(self) -> float:
        """The current fake time."""
        return self.now

    async def sleep(self, seconds: float) -> None:
        """Sleep until the fake time has advanced by ``seconds``."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + max(0.0, seconds), next(self._seq), fut))
        await fut

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking every sleeper that is due, in order."""
        target = self.now + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            when, _, fut = heapq.heappop(self._sleepers)
            self.now = max(self.now, when)
            if not fut.done():
                fut.set_result(None)
            await settle()
        self.now = target
        await settle()


async def settle(rounds: int = 20) -> None:
    """Let every ready task run until nothing more happens (a few loop iterations)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


@dataclass
class FakeProcess:
    """A process that exits when the test (or a signal) says so."""

    pid: int
    create_time: float = 0.0
    ignore_sigterm: bool = False
    exit_code_on_term: int = 0
    signals: list[signal.Signals] = field(default_factory=list)
    _exit: asyncio.Future[int | None] | None = None

    def _fut(self) -> asyncio.Future[int | None]:
        if self._exit is None:
            self._exit = asyncio.get_running_loop().create_future()
        return self._exit

    def exit(self, code: int | None) -> None:
        """Make the process exit with ``code``."""
        fut = self._fut()
        if not fut.done():
            fut.set_result(code)

    async def wait(self) -> int | None:
        """Wait for the exit."""
        return await asyncio.shield(self._fut())

    def exited(self) -> bool:
        """Whether it has exited."""
        return self._exit is not None and self._exit.done()

    def signal_group(self, sig: signal.Signals) -> None:
        """Record the signal; SIGKILL always ends it, SIGTERM unless ignored."""
        self.signals.append(sig)
        if sig is signal.SIGKILL:
            self.exit(-9)
        elif sig is signal.SIGTERM and not self.ignore_sigterm:
            self.exit(self.exit_code_on_term)

    def group_pids(self) -> list[int]:
        """Nothing lingers in a fake group once the leader is gone."""
        return [] if self.exited() else [self.pid]


class FakeLauncher:
    """Hands out FakeProcesses; ``fail_with`` makes the next spawns fail like a missing binary."""

    def __init__(self) -> None:
        self.spawned: list[FakeProcess] = []
        self.argvs: list[tuple[str, ...]] = []
        self.fail_with: str | None = None
        self.ignore_sigterm = False
        self._pids = itertools.count(40_000)

    def spawn(self, argv: Sequence[str], *, env: Mapping[str, str], log_path: Path) -> FakeProcess:
        """A new fake process (or EngineStartError when told to fail)."""
        del env, log_path
        if self.fail_with is not None:
            raise EngineStartError(self.fail_with)
        proc = FakeProcess(next(self._pids), ignore_sigterm=self.ignore_sigterm)
        self.spawned.append(proc)
        self.argvs.append(tuple(argv))
        return proc

    def adopt(self, pid: int, create_time: float) -> FakeProcess | None:
        """Fake processes are never adopted."""
        del pid, create_time
        return None

    @property
    def last(self) -> FakeProcess:
        """The most recently spawned process."""
        return self.spawned[-1]


class ScriptedChecks:
    """Engine checks whose answers the test sets: ``healthy``, ``running_requests``."""

    def __init__(self) -> None:
        self.healthy = False
        self.running_requests = 0
        self.calls = 0

    async def ready(self) -> ProbeResult:
        """Healthy or connection refused."""
        self.calls += 1
        return ProbeResult(self.healthy, "200" if self.healthy else "connection refused")

    async def alive(self) -> ProbeResult:
        """Healthy or no answer."""
        self.calls += 1
        return ProbeResult(self.healthy, "200" if self.healthy else "no answer within 2 s")

    async def idle(self) -> bool | None:
        """No running requests."""
        return self.running_requests == 0
