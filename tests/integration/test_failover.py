"""GPU faults end to end on the simulated host: MiMo moves, evicted models come back.

The reference lab in miniature: MiMo (vLLM, 14 + 2 GiB) fills gpu0; two Ollama specialists
share gpu1. Real daemon, real emulated engine processes, faults injected into the simulated
host the way `python -m fleetd.sim DIR lose|heal|xid|foreign` does.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from daemon_harness import Fleet, running_fleet

from fleetd.api import views
from fleetd.control import Caller
from fleetd.model.worker import WorkerState

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

LAB = """
[[models]]
name = "mimo-vl"
engine = "vllm"
model = "XiaomiMiMo/MiMo-VL-7B-RL"
vram_gib = 14.0
overhead_gib = 2.0
priority = 100
preferred_gpus = [0]
capabilities = ["vision", "chat"]
[models.health]
HEALTH

[[models]]
name = "deepcoder:14b"
engine = "ollama"
model = "deepcoder:14b"
vram_gib = 9.0
overhead_gib = 0.5
priority = 50
[models.health]
HEALTH

[[models]]
name = "qwen2.5vl:3b"
engine = "ollama"
model = "qwen2.5vl:3b"
vram_gib = 3.2
overhead_gib = 0.3
priority = 40
[models.health]
HEALTH

[gpus]
health_debounce_s = 0.3
failback = "{failback}"
failback_after_s = 1.0
max_moves = {max_moves}
moves_window_s = 600
"""
OPERATOR = Caller(uid=0, pid=1)


def lab(*, failback: str = "auto", max_moves: int = 3) -> str:
    return LAB.replace("{failback}", failback).replace("{max_moves}", str(max_moves))


def where(fleet: Fleet) -> dict[str, tuple[int, str]]:
    return {s.name: (s.gpu_index, s.state.value) for s in fleet.reconciler.workers()}


def pending(fleet: Fleet) -> dict[str, str]:
    plan = fleet.reconciler.plan
    return {p.model: p.reason for p in plan.pending} if plan is not None else {}


def ready_on(fleet: Fleet, name: str, gpu: int) -> bool:
    return any(
        s.name == name and s.gpu_index == gpu and s.state is WorkerState.READY
        for s in fleet.reconciler.workers()
    )


async def lab_ready(fleet: Fleet) -> None:
    await fleet.wait_until(
        "the lab is up",
        lambda: (
            ready_on(fleet, "mimo-vl", 0)
            and ready_on(fleet, "deepcoder:14b", 1)
            and ready_on(fleet, "qwen2.5vl:3b", 1)
        ),
        timeout_s=60,
    )


def gpu0_health(fleet: Fleet) -> str:
    host = fleet.reconciler.host
    return host.gpus[0].health.value if host is not None else ""


def kinds(fleet: Fleet) -> list[str]:
    fleet.drain_events()
    return [e.kind for e in fleet.seen]


def explain(fleet: Fleet, model: str) -> str:
    doc = views.explain(fleet.daemon.control, model, fleet.daemon.bus, now_s=0.0)
    return "\n".join(doc["lines"])


async def test_gpu0_lost_mimo_moves_specialists_evicted_then_restored_on_failback(
    tmp_path: Path,
) -> None:
    async with running_fleet(tmp_path, lab()) as fleet:
        await lab_ready(fleet)
        gpu0 = fleet.host.gpus()[0].uuid
        fleet.host.set_fault(gpu0, lost=True)
        await fleet.wait_until("MiMo on gpu1", lambda: ready_on(fleet, "mimo-vl", 1), timeout_s=60)
        # evicted by priority to make room; with gpu0 gone they have nowhere to go
        waiting = pending(fleet)
        assert set(waiting) == {"deepcoder:14b", "qwen2.5vl:3b"}
        assert "gpu0 is lost" in waiting["deepcoder:14b"]
        story = explain(fleet, "mimo-vl")
        assert "Replica 0 is placed on gpu1" in story
        assert "gpu0 is lost" in story
        assert "cordoned by fleetd after a fault" in story
        assert {"gpu.lost", "gpu.fault_cordoned"} <= set(kinds(fleet))
        assert gpu0 in fleet.reconciler.overrides.fault_cordoned

        # the GPU comes back (reset): held for failback_after_s, then the evicted come back
        fleet.host.clear_faults(gpu0)
        await fleet.wait_until(
            "gpu0 healthy and held",
            lambda: "held after a fault" in explain(fleet, "deepcoder:14b"),
            timeout_s=10,
        )
        await fleet.wait_until(
            "specialists restored on gpu0",
            lambda: ready_on(fleet, "deepcoder:14b", 0) and ready_on(fleet, "qwen2.5vl:3b", 0),
            timeout_s=60,
        )
        assert "gpu.failback" in kinds(fleet)
        assert ready_on(fleet, "mimo-vl", 1), "failback does not cold-load MiMo back"
        assert not pending(fleet)
        assert fleet.reconciler.overrides.fault_cordoned == frozenset()


async def test_xid_79_evacuates_and_manual_failback_waits_for_uncordon(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, lab(failback="manual")) as fleet:
        await lab_ready(fleet)
        gpu0 = fleet.host.gpus()[0].uuid
        fleet.host.inject_xid(gpu0, 79)
        await fleet.wait_until("MiMo on gpu1", lambda: ready_on(fleet, "mimo-vl", 1), timeout_s=60)
        assert "fallen off the bus" in pending(fleet)["deepcoder:14b"]
        fleet.host.clear_faults(gpu0)  # the node was rebooted / the GPU reset
        await asyncio.sleep(2.0)  # longer than failback_after_s: manual means manual
        assert set(pending(fleet)) == {"deepcoder:14b", "qwen2.5vl:3b"}
        assert "failback = manual" in pending(fleet)["deepcoder:14b"]
        fleet.daemon.control.cordon("0", OPERATOR, on=False)
        await fleet.wait_until(
            "specialists back",
            lambda: ready_on(fleet, "deepcoder:14b", 0) and ready_on(fleet, "qwen2.5vl:3b", 0),
            timeout_s=60,
        )


async def test_xid_13_restarts_the_worker_in_place(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, lab()) as fleet:
        await lab_ready(fleet)
        before = fleet.status("mimo-vl")
        gpu0 = fleet.host.gpus()[0].uuid
        fleet.host.inject_xid(gpu0, 13)
        fleet.host.inject_xid(gpu0, 13)  # a burst restarts once
        await fleet.wait_until(
            "MiMo restarted on gpu0",
            lambda: (
                fleet.status("mimo-vl").pid not in (None, before.pid)
                and ready_on(fleet, "mimo-vl", 0)
            ),
            timeout_s=60,
        )
        seen = kinds(fleet)
        assert seen.count("gpu.xid_error") == 1
        assert "gpu.lost" not in seen
        assert "gpu.fault_cordoned" not in seen
        assert ready_on(fleet, "deepcoder:14b", 1)
        assert not fleet.reconciler.overrides.cordoned


async def test_both_gpus_lost_is_a_clear_degraded_status_and_nothing_thrashes(
    tmp_path: Path,
) -> None:
    async with running_fleet(tmp_path, lab()) as fleet:
        await lab_ready(fleet)
        for gpu in fleet.host.gpus():
            fleet.host.set_fault(gpu.uuid, lost=True)
        await fleet.wait_until("everything pending", lambda: len(pending(fleet)) == 3, timeout_s=30)
        await asyncio.sleep(0.5)
        starts_before = kinds(fleet).count("worker.state_changed")
        await asyncio.sleep(2.0)  # several reconcile passes
        starts_after = kinds(fleet).count("worker.state_changed")
        assert starts_after == starts_before, "workers churn while no GPU is usable"
        assert all("gpu0 is lost" in r and "gpu1 is lost" in r for r in pending(fleet).values())
        status = views.status(fleet.daemon.control, started_at=0, config_path="", now_s=0)
        assert [g["health"] for g in status["gpus"]] == ["lost", "lost"]
        assert not any(w["state"] == "ready" for w in status["workers"])


async def test_foreign_process_on_gpu1_blocks_failover_with_pid_and_mib(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, lab()) as fleet:
        await lab_ready(fleet)
        gpu0, gpu1 = (g.uuid for g in fleet.host.gpus())
        fleet.host.claim(gpu1, 2048, pid=4242, name="foreign", persistent=True, check_free=False)
        fleet.host.set_fault(gpu0, lost=True)
        await fleet.wait_until("MiMo pending", lambda: "mimo-vl" in pending(fleet), timeout_s=30)
        reason = pending(fleet)["mimo-vl"]
        assert "pid 4242 not ours" in reason
        assert "2.0 GiB" in reason
        # the specialists are not evicted for nothing: MiMo cannot fit even then
        await asyncio.sleep(1.0)
        assert ready_on(fleet, "deepcoder:14b", 1)
        assert ready_on(fleet, "qwen2.5vl:3b", 1)


async def test_flapping_gpu_is_held_after_max_moves(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, lab(max_moves=2)) as fleet:
        await lab_ready(fleet)
        gpu0 = fleet.host.gpus()[0].uuid
        for _ in range(2):
            fleet.host.set_fault(gpu0, lost=True)
            await fleet.wait_until("gpu0 lost", lambda: gpu0_health(fleet) == "lost")
            fleet.host.clear_faults(gpu0)
            await fleet.wait_until("gpu0 back", lambda: gpu0_health(fleet) == "healthy")
        await fleet.wait_until("flapping said", lambda: "gpu.flapping" in kinds(fleet))
        await asyncio.sleep(1.5)  # past failback_after_s: still held
        assert gpu0 in fleet.reconciler.overrides.fault_cordoned
        assert "flapping" in explain(fleet, "deepcoder:14b")
        assert "gpu.failback" not in kinds(fleet)


async def test_replica_that_crash_loops_on_its_gpu_fails_over(tmp_path: Path) -> None:
    # the engine dies at once on gpu0 only (a broken card, a bad driver state)
    wrapper = tmp_path / "vllm-on-gpu0-dies.sh"
    wrapper.write_text(
        '#!/bin/sh\nif [ "$CUDA_VISIBLE_DEVICES" = 0 ]; then echo "CUDA error" >&2; exit 1; fi\n'
        'exec "$FLEETD_PYTHON" -m fleetd.sim.vllm "$@"\n'
    )
    wrapper.chmod(0o755)

    async with running_fleet(
        tmp_path / "f",
        lab(),
        vllm_command=str(wrapper),
        engine_env={"FLEETD_PYTHON": sys.executable},
    ) as fleet:
        await fleet.wait_until("MiMo on gpu1", lambda: ready_on(fleet, "mimo-vl", 1), timeout_s=90)
        assert "worker.failover" in kinds(fleet)
        story = explain(fleet, "mimo-vl")
        assert "crash-looped on gpu0" in story


async def test_scale_to_two_replicas_evicts_and_scaling_back_restores(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, lab()) as fleet:
        await lab_ready(fleet)
        fleet.daemon.control.scale("mimo-vl", 2, OPERATOR)
        await fleet.wait_until(
            "two MiMo replicas",
            lambda: ready_on(fleet, "mimo-vl", 0) and ready_on(fleet, "mimo-vl#1", 1),
            timeout_s=60,
        )
        assert set(pending(fleet)) == {"deepcoder:14b", "qwen2.5vl:3b"}
        fleet.daemon.control.scale("mimo-vl", 1, OPERATOR)
        await fleet.wait_until(
            "specialists restored",
            lambda: ready_on(fleet, "deepcoder:14b", 1) and ready_on(fleet, "qwen2.5vl:3b", 1),
            timeout_s=60,
        )
        assert not pending(fleet)


async def test_warm_standby_wakes_on_gpu1_instead_of_a_cold_load(tmp_path: Path) -> None:
    models = lab().replace("preferred_gpus = [0]\n", "preferred_gpus = [0]\nstandby = true\n")
    async with running_fleet(tmp_path, models, load_s=2.0) as fleet:
        await fleet.wait_until(
            "standby asleep, specialists beside it",
            lambda: (
                any(
                    s.name == "mimo-vl~standby"
                    and s.state is WorkerState.STANDBY
                    and s.gpu_index == 1
                    for s in fleet.reconciler.workers()
                )
                and ready_on(fleet, "mimo-vl", 0)
                and ready_on(fleet, "deepcoder:14b", 1)
            ),
            timeout_s=90,
        )
        # asleep it holds little: the specialists fit beside it
        status = views.status(fleet.daemon.control, started_at=0, config_path="", now_s=0)
        assert any(p.replica == 64 for p in fleet.reconciler.plan.placements)  # type: ignore[union-attr]
        assert all(w["state"] != "pending" for w in status["workers"])
        assert "The warm standby is placed on gpu1" in explain(fleet, "mimo-vl")
        standby_pid = fleet.status("mimo-vl~standby").pid
        # a degraded gpu0 keeps what runs: the standby stays asleep
        gpu0 = fleet.host.gpus()[0].uuid
        fleet.host.set_fault(gpu0, ecc_uncorrected=2)
        await fleet.wait_until("gpu0 degraded", lambda: gpu0_health(fleet) == "degraded")
        await asyncio.sleep(0.5)
        assert fleet.status("mimo-vl~standby").state is WorkerState.STANDBY
        assert ready_on(fleet, "mimo-vl", 0)
        mark = len(kinds(fleet))
        fleet.host.set_fault(gpu0, lost=True)
        await fleet.wait_until("MiMo on gpu1", lambda: ready_on(fleet, "mimo-vl", 1), timeout_s=60)
        mimo = fleet.status("mimo-vl")
        assert mimo.pid == standby_pid, "the standby itself serves: no new process"
        assert mimo.reason.startswith("woken from standby")
        after = kinds(fleet)[mark:]
        assert "worker.promoted" in after
        assert "worker.waking" in after
        starts = [
            e
            for e in fleet.seen
            if e.fields.get("worker") == "mimo-vl" and e.fields.get("new") == "starting"
        ]
        assert all(e.fields.get("gpu") != 1 for e in starts), "no cold start on gpu1"
        assert set(pending(fleet)) >= {"deepcoder:14b", "mimo-vl"}  # mimo-vl: the new standby


SHRINKABLE = """
[[models]]
name = "mimo-vl"
engine = "vllm"
model = "acme/vision-4B"
vram_gib = 8.0
overhead_gib = 2.0
priority = 100
preferred_gpus = [0]
[models.health]
HEALTH

[[models]]
name = "deepcoder:14b"
engine = "ollama"
model = "deepcoder:14b"
vram_gib = 9.0
min_vram_gib = 2.0
overhead_gib = 0.5
priority = 50
[models.health]
HEALTH

[[models]]
name = "qwen2.5vl:3b"
engine = "ollama"
model = "qwen2.5vl:3b"
vram_gib = 3.2
overhead_gib = 0.3
priority = 60
[models.health]
HEALTH

[gpus]
health_debounce_s = 0.3
failback = "manual"
"""


async def test_an_evicted_model_comes_back_partially_offloaded_where_room_remains(
    tmp_path: Path,
) -> None:
    async with running_fleet(tmp_path, SHRINKABLE) as fleet:
        await fleet.wait_until(
            "up",
            lambda: ready_on(fleet, "mimo-vl", 0) and ready_on(fleet, "deepcoder:14b", 1),
            timeout_s=60,
        )
        fleet.host.set_fault(fleet.host.gpus()[0].uuid, lost=True)
        await fleet.wait_until(
            "all three on gpu1",
            lambda: (
                ready_on(fleet, "mimo-vl", 1)
                and ready_on(fleet, "qwen2.5vl:3b", 1)
                and ready_on(fleet, "deepcoder:14b", 1)
            ),
            timeout_s=90,
        )
        coder = fleet.status("deepcoder:14b")
        assert coder.budget_mib == 2560  # what gpu1 had left: 16 - 10 - 3.5 GiB
        assert "partial offload" in coder.reason
        plan = fleet.reconciler.plan
        assert plan is not None
        (placed,) = [p for p in plan.placements if p.model == "deepcoder:14b"]
        assert placed.note.startswith("shrunk to fit: 2.5 GiB of 9.5 GiB in VRAM")
        assert not pending(fleet)
