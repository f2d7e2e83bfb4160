"""ProcessWorker's state machine, step by step, with a manual clock and fake processes."""

from __future__ import annotations

import asyncio
import random
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fleetd.config import HealthSpec
from fleetd.model.worker import StopReason, WorkerState
from fleetd.obs.events import EventBus
from fleetd.supervisor import GpuGate, ProcessWorker, WorkerSpec
from fleetd.testing import FakeLauncher, ManualClock, ScriptedChecks, settle

HEALTH = HealthSpec(
    start_timeout_s=60,
    probe_interval_s=5,
    probe_timeout_s=1,
    unhealthy_after=3,
    stop_grace_s=10,
    drain_timeout_s=30,
    backoff_initial_s=2,
    backoff_max_s=60,
    max_restarts=3,
    restart_window_s=300,
)


class World:
    def __init__(self, tmp: Path) -> None:
        self.clock = ManualClock()
        self.bus = EventBus()
        self.launcher = FakeLauncher()
        self.checks = ScriptedChecks()
        self.free_mib = 16384
        self.events = self.bus.subscribe()
        spec = WorkerSpec(
            name="m#0",
            engine="vllm",
            models=("m",),
            gpu_uuid="GPU-x",
            gpu_index=0,
            budget_mib=8192,
            port=18100,
            argv=("vllm", "serve", "m"),
            env={},
            log_path=tmp / "m.log",
            health=HEALTH,
            drain_timeout_s=HEALTH.drain_timeout_s,
        )
        self.worker = ProcessWorker(
            spec,
            checks=self.checks,
            launcher=self.launcher,
            clock=self.clock,
            bus=self.bus,
            gate=GpuGate(asyncio.Lock(), self._free),
            rng=random.Random(7),
        )

    async def _free(self) -> tuple[int, str]:
        return self.free_mib, "pid 1 not ours"

    def transitions(self) -> list[tuple[str, str]]:
        out = []
        while (event := self.events.get_nowait()) is not None:
            if event.kind == "worker.state_changed":
                out.append((event.fields["old"], event.fields["new"]))
        return out


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = World(tmp_path)
    task = asyncio.create_task(w.worker.run())
    yield w
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def now(w: World) -> WorkerState:
    """The worker's state (a call, so type checkers do not narrow it across awaits)."""
    return w.worker.state


async def start_ready(w: World) -> None:
    w.worker.ensure_running()
    await settle()
    w.checks.healthy = True
    await w.clock.advance(0.25)
    assert now(w) is WorkerState.READY


async def test_start_to_ready(world: World) -> None:
    world.worker.ensure_running()
    await settle()
    assert now(world) is WorkerState.STARTING
    await world.clock.advance(10)  # still loading: connection refused
    assert now(world) is WorkerState.STARTING
    world.checks.healthy = True
    await world.clock.advance(0.25)
    assert now(world) is WorkerState.READY
    assert world.transitions() == [("stopped", "starting"), ("starting", "ready")]


async def test_crash_goes_to_backoff_then_restarts_with_growing_delay(world: World) -> None:
    await start_ready(world)
    world.transitions()
    world.checks.healthy = False  # the restarted engine has to load again
    world.launcher.last.exit(1)
    await settle()
    assert now(world) is WorkerState.BACKOFF
    assert "exited with code 1" in world.worker.reason
    first_delay = float(world.worker.reason.split("restarting in ")[1].split(" s")[0])
    assert 1.6 <= first_delay <= 2.4  # 2 s +-20 % jitter
    await world.clock.advance(first_delay)
    assert now(world) is WorkerState.STARTING
    assert len(world.launcher.spawned) == 2
    world.checks.healthy = True
    await world.clock.advance(0.25)
    assert now(world) is WorkerState.READY
    world.launcher.last.exit(1)
    await settle()
    second_delay = float(world.worker.reason.split("restarting in ")[1].split(" s")[0])
    assert 3.2 <= second_delay <= 4.8  # doubled
    assert world.transitions() == [
        ("ready", "backoff"),
        ("backoff", "starting"),
        ("starting", "ready"),
        ("ready", "backoff"),
    ]


async def test_crash_loop_ends_in_failed_until_an_operator_restarts(world: World) -> None:
    world.worker.ensure_running()
    await settle()
    for _ in range(HEALTH.max_restarts):
        world.launcher.last.exit(1)  # dies while loading
        await settle()
        await world.clock.advance(HEALTH.backoff_max_s)
    assert now(world) is WorkerState.FAILED
    assert "crash loop" in world.worker.reason
    spawned = len(world.launcher.spawned)
    world.worker.ensure_running()  # the reconciler's nudges do not restart a failed worker
    await world.clock.advance(600)
    assert len(world.launcher.spawned) == spawned
    world.worker.restart()  # fleetctl restart does
    await settle()
    assert now(world) is WorkerState.STARTING
    assert len(world.launcher.spawned) == spawned + 1


async def test_start_timeout_kills_the_group_and_backs_off(world: World) -> None:
    world.worker.ensure_running()
    await settle()
    proc = world.launcher.last
    await world.clock.advance(HEALTH.start_timeout_s + 1)
    assert now(world) is WorkerState.BACKOFF
    assert "not healthy within start_timeout_s=60" in world.worker.reason
    assert signal.SIGTERM in proc.signals
    assert proc.exited()


async def test_hang_is_detected_after_consecutive_failed_probes(world: World) -> None:
    await start_ready(world)
    proc = world.launcher.last
    world.checks.healthy = False  # stops answering, process still alive
    await world.clock.advance(HEALTH.probe_interval_s * 2)
    assert now(world) is WorkerState.READY  # two failures: not yet
    await world.clock.advance(HEALTH.probe_interval_s)
    await settle()
    assert now(world) is WorkerState.BACKOFF
    assert world.worker.reason.startswith("hung: 3 health probes failed in a row")
    assert proc.signals[0] is signal.SIGTERM


async def test_sigterm_ignored_escalates_to_sigkill_after_grace(world: World) -> None:
    await start_ready(world)
    proc = world.launcher.last
    proc.ignore_sigterm = True
    world.worker.ensure_stopped(StopReason.OPERATOR, drain=False)
    await world.clock.advance(HEALTH.probe_interval_s)
    assert now(world) is WorkerState.STOPPING
    assert proc.signals == [signal.SIGTERM]
    await world.clock.advance(HEALTH.stop_grace_s - 1)
    assert proc.signals == [signal.SIGTERM]  # still within the grace period
    await world.clock.advance(1)
    assert proc.signals == [signal.SIGTERM, signal.SIGKILL]
    assert now(world) is WorkerState.STOPPED
    assert world.worker.reason == "stopped (operator): killed after the grace period"


async def test_drain_waits_for_running_requests_then_stops(world: World) -> None:
    await start_ready(world)
    world.transitions()
    world.checks.running_requests = 2
    world.worker.ensure_stopped(StopReason.MOVED)
    await settle()
    assert now(world) is WorkerState.DRAINING
    await world.clock.advance(5)
    assert now(world) is WorkerState.DRAINING  # still busy
    world.checks.running_requests = 0
    await world.clock.advance(0.2)
    await settle()
    assert now(world) is WorkerState.STOPPED
    assert world.transitions() == [
        ("ready", "draining"),
        ("draining", "stopping"),
        ("stopping", "stopped"),
    ]


async def test_drain_is_bounded_by_drain_timeout(world: World) -> None:
    await start_ready(world)
    world.checks.running_requests = 1  # never finishes
    world.worker.ensure_stopped(StopReason.MOVED)
    await settle()
    await world.clock.advance(HEALTH.drain_timeout_s + 1)
    await settle()
    assert now(world) is WorkerState.STOPPED


async def test_start_waits_for_memory_without_counting_a_failure(world: World) -> None:
    world.free_mib = 4000
    world.worker.ensure_running()
    await settle()
    assert now(world) is WorkerState.BACKOFF
    assert world.worker.reason == (
        "waiting for GPU memory: needs 8192 MiB, gpu0 has 4000 MiB free (pid 1 not ours)"
    )
    assert world.launcher.spawned == []
    world.free_mib = 16384
    world.worker.ensure_running()  # the reconciler's next pass
    await settle()
    assert now(world) is WorkerState.STARTING
    assert world.worker.restarts == 0


async def test_missing_engine_binary_fails_with_the_message(world: World) -> None:
    world.launcher.fail_with = "engine command 'vllm' not found on PATH"
    world.worker.ensure_running()
    await settle()
    assert now(world) is WorkerState.FAILED
    assert world.worker.reason == "engine command 'vllm' not found on PATH"


async def test_operator_restart_drains_and_starts_again(world: World) -> None:
    await start_ready(world)
    world.transitions()
    world.worker.restart()
    await settle()
    await world.clock.advance(0.25)
    assert now(world) is WorkerState.READY
    assert len(world.launcher.spawned) == 2
    assert world.transitions() == [
        ("ready", "draining"),
        ("draining", "stopping"),
        ("stopping", "stopped"),
        ("stopped", "starting"),
        ("starting", "ready"),
    ]


async def test_stop_while_starting_stops_the_process(world: World) -> None:
    world.worker.ensure_running()
    await settle()
    proc = world.launcher.last
    world.worker.ensure_stopped(StopReason.DESIRED_REMOVED)
    await world.clock.advance(0.25)
    await settle()
    assert now(world) is WorkerState.STOPPED
    assert proc.exited()


async def test_nudges_do_not_cut_a_backoff_short(world: World) -> None:
    """Regression: the reconciler calls ensure_running on every pass; backoff must hold."""
    await start_ready(world)
    world.checks.healthy = False
    world.launcher.last.exit(1)
    await settle()
    assert now(world) is WorkerState.BACKOFF
    for _ in range(5):
        world.worker.ensure_running()
        await world.clock.advance(0.3)  # 1.5 s in all: less than the 1.6 s minimum delay
    assert now(world) is WorkerState.BACKOFF
    assert len(world.launcher.spawned) == 1
    await world.clock.advance(1.0)
    assert now(world) is WorkerState.STARTING
