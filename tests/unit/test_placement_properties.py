"""Planner properties under hypothesis: the rules hold for any host, fleet and history."""

from __future__ import annotations

import random
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from fleetd.config import ModelSpec
from fleetd.model.gpu import GpuHealth, GpuProcess, GpuSnapshot, HostSnapshot
from fleetd.planning import placement
from fleetd.planning.types import STANDBY_REPLICA, CurrentReplica, Overrides, Plan

SIZES_MIB = (8192, 12288, 16384, 24576, 81920)


@dataclass(frozen=True)
class Case:
    models: list[ModelSpec]
    host: HostSnapshot
    current: list[CurrentReplica]
    overrides: Overrides


@st.composite
def cases(draw: st.DrawFn) -> Case:
    n_gpus = draw(st.integers(0, 4))
    gpus = []
    for i in range(n_gpus):
        total = draw(st.sampled_from(SIZES_MIB))
        health = draw(
            st.sampled_from([GpuHealth.HEALTHY] * 4 + [GpuHealth.DEGRADED, GpuHealth.LOST])
        )
        foreign = draw(st.integers(0, total // 4)) if draw(st.booleans()) else 0
        gpus.append(
            GpuSnapshot(
                index=i,
                uuid=f"GPU-{i:08x}-aaaa-bbbb-cccc-dddddddddddd",
                name="prop",
                total_mib=total,
                reserved_mib=draw(st.sampled_from([0, 256])),
                used_mib=foreign,
                free_mib=0,
                processes=(GpuProcess(10_000 + i, foreign),) if foreign else (),
                health=health,
            )
        )
    n_models = draw(st.integers(0, 7))
    models = []
    for m in range(n_models):
        allowed = draw(st.sets(st.integers(0, 4), max_size=2)) if draw(st.booleans()) else set()
        engine = draw(st.sampled_from(["vllm", "ollama"]))
        vram_halves = draw(st.integers(1, 60))
        # Ollama models may shrink (partial offload); vLLM models may keep a warm standby
        shrink = engine == "ollama" and draw(st.booleans())
        models.append(
            ModelSpec(
                name=f"m{m}",
                engine=engine,
                model=f"m{m}",
                vram_gib=vram_halves / 2,
                min_vram_gib=draw(st.integers(1, vram_halves)) / 2 if shrink else None,
                standby=engine == "vllm" and draw(st.integers(0, 3)) == 0,
                overhead_gib=draw(st.sampled_from([0.0, 0.5, 2.0])),
                priority=draw(st.integers(0, 4)),
                replicas=draw(st.integers(0, 3)),
                allowed_gpus=tuple(sorted(allowed)),
            )
        )
    current: list[CurrentReplica] = []
    if gpus:
        for spec in models:
            for r in range(spec.replicas):
                if draw(st.booleans()):
                    gpu = draw(st.sampled_from(gpus))
                    current.append(CurrentReplica(spec.name, r, gpu.uuid))
    uuids = [g.uuid for g in gpus]
    cordoned = draw(st.sets(st.sampled_from(uuids), max_size=1)) if uuids else set()
    drained = draw(st.sets(st.sampled_from(uuids), max_size=1)) if uuids else set()
    scale = {m.name: draw(st.integers(0, 3)) for m in models if draw(st.booleans())}
    drained_models = {m.name for m in models if draw(st.integers(0, 5)) == 0}
    avoid = {
        (m.name, r, draw(st.sampled_from(uuids)))
        for m in models
        for r in range(3)
        if uuids and draw(st.integers(0, 4)) == 0
    }
    overrides = Overrides(
        replicas=scale,
        cordoned=frozenset(cordoned),
        drained=frozenset(drained),
        drained_models=frozenset(drained_models),
        avoid=frozenset(avoid),
    )
    return Case(models, HostSnapshot(gpus=tuple(gpus)), current, overrides)


def run(case: Case) -> Plan:
    return placement.plan(case.models, case.host, current=case.current, overrides=case.overrides)


def capacity_mib(gpu: GpuSnapshot) -> int:
    return gpu.total_mib - gpu.reserved_mib - gpu.used_mib  # nothing of ours holds memory here


def may_start_on(spec: ModelSpec, gpu: GpuSnapshot, case: Case, replica: int) -> bool:
    return (
        (spec.name, replica, gpu.uuid) not in case.overrides.avoid
        and gpu.health is GpuHealth.HEALTHY
        and gpu.uuid not in case.overrides.cordoned
        and gpu.uuid not in case.overrides.drained
        and (not spec.allowed_gpus or gpu.index in spec.allowed_gpus)
    )


@settings(max_examples=400, deadline=None)
@given(cases())
def test_no_gpu_is_ever_overcommitted(case: Case) -> None:
    result = run(case)
    for gpu in case.host.gpus:
        placed = sum(p.budget_mib for p in result.placements if p.gpu_uuid == gpu.uuid)
        assert placed <= capacity_mib(gpu), (gpu.index, placed, capacity_mib(gpu))
    for p in result.placements:
        gpu = next(g for g in case.host.gpus if g.uuid == p.gpu_uuid)
        assert gpu.health is not GpuHealth.LOST
        assert gpu.uuid not in case.overrides.drained
        if not p.kept:
            spec = next(m for m in case.models if m.name == p.model)
            assert may_start_on(spec, gpu, case, p.replica), p
    for p in result.placements:
        assert (p.model, p.replica, p.gpu_uuid) not in case.overrides.avoid, p


@settings(max_examples=400, deadline=None)
@given(cases())
def test_a_lower_priority_never_displaces_a_higher_one(case: Case) -> None:
    """A pending replica could not fit anywhere even by evicting everything of lower priority."""
    result = run(case)
    specs = {m.name: m for m in case.models}
    for pend in result.pending:
        spec = specs[pend.model]
        for gpu in case.host.gpus:
            here = [p for p in result.placements if p.gpu_uuid == gpu.uuid]
            if not may_start_on(spec, gpu, case, pend.replica) or any(
                p.model == spec.name for p in here
            ):
                continue
            free = capacity_mib(gpu) - sum(p.budget_mib for p in here)
            lower = sum(p.budget_mib for p in here if p.priority < spec.priority)
            assert free + lower < spec.budget_mib, (pend, gpu.index, free, lower)


@settings(max_examples=200, deadline=None)
@given(cases(), st.randoms(use_true_random=False))
def test_same_input_same_plan_in_any_order(case: Case, rnd: random.Random) -> None:
    first = run(case)
    assert run(case) == first
    shuffled_models, shuffled_current = case.models[:], case.current[:]
    rnd.shuffle(shuffled_models)
    rnd.shuffle(shuffled_current)
    again = placement.plan(
        shuffled_models, case.host, current=shuffled_current, overrides=case.overrides
    )
    assert again == first


@settings(max_examples=200, deadline=None)
@given(cases())
def test_carrying_out_a_plan_then_replanning_changes_nothing(case: Case) -> None:
    """Stability: once the plan runs, the next plan keeps every replica and stops none."""
    first = run(case)
    running = [
        CurrentReplica(p.model, p.replica, p.gpu_uuid, budget_mib=p.budget_mib)
        for p in first.placements
    ]
    second = placement.plan(case.models, case.host, current=running, overrides=case.overrides)
    assert second.stops == ()
    assert all(p.kept for p in second.placements)
    assert {p.key for p in second.placements} == {p.key for p in first.placements}


@settings(max_examples=200, deadline=None)
@given(cases())
def test_every_wanted_replica_is_placed_or_pending_exactly_once(case: Case) -> None:
    result = run(case)
    wanted = {
        (m.name, r) for m in case.models for r in range(case.overrides.wanted(m.name, m.replicas))
    } | {
        (m.name, STANDBY_REPLICA)
        for m in case.models
        if m.standby and case.overrides.wanted(m.name, m.replicas) > 0
    }
    placed = [p.key for p in result.placements]
    pending = [(p.model, p.replica) for p in result.pending]
    assert len(placed) + len(pending) == len(wanted)
    assert set(placed) | set(pending) == wanted
    for p in result.pending:
        assert p.reason.startswith(("evicted", "it no longer", "its GPU", "gpu", p.model))
