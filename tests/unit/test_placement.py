"""The placement planner, as tables over recorded GPU inventories and small scenarios."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from planning_helpers import host, inventory, model

from fleetd import config
from fleetd.model.gpu import GpuProcess
from fleetd.planning import placement
from fleetd.planning.types import CurrentReplica, Overrides, Plan, StopCause

EXAMPLE = Path(__file__).resolve().parents[2] / "etc" / "fleetd.toml"


def where(plan: Plan) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for p in plan.placements:
        out.setdefault(p.model, []).append(p.gpu_index)
    return out


def test_example_config_on_its_simulated_host() -> None:
    """The example fleet: MiMo fills gpu0, the specialists share gpu1, one stays pending."""
    cfg = config.load_config(EXAMPLE)
    result = placement.plan(cfg.models, host(16384, 16384))
    assert where(result) == {
        "mimo-vl": [0],
        "deepcoder:14b": [1],
        "qwen2.5vl:3b": [1],
        "mixtral:8x22b": [1],
    }
    [pending] = result.pending
    assert pending.model == "deepseek-r1:32b"
    assert pending.reason == (
        "deepseek-r1:32b needs 5.5 GiB; gpu0 has 0.0 GiB free (mimo-vl 16.0 GiB); "
        "gpu1 has 0.1 GiB free (deepcoder:14b 9.5 GiB, qwen2.5vl:3b 3.5 GiB, "
        "mixtral:8x22b 2.9 GiB), 3.0 GiB even after evicting lower priorities"
    )
    mixtral = next(p for p in result.placements if p.model == "mixtral:8x22b")
    assert mixtral.note == "partial offload: 2.9 GiB in VRAM, 77.6 GiB in system RAM"


def test_seed_budget_of_18_gib_on_a_16_gib_card_is_refused_with_numbers() -> None:
    """The seed's 14 GB + 4 GB on a 16 GiB card: pending, naming every GPU's total."""
    mimo = model("mimo-vl", 14.0, overhead_gib=4.0, prio=100)
    result = placement.plan([mimo], inventory("lab_2x4070tis"))
    assert result.placements == ()
    assert result.pending[0].reason == (
        "mimo-vl needs 18.0 GiB; gpu0 has only 16.0 GiB usable in total; "
        "gpu1 has only 16.0 GiB usable in total"
    )


def test_sixteen_gib_budget_on_the_real_card_shows_the_mib_shortfall() -> None:
    """A real 4070 Ti SUPER has 16376 MiB: 14 + 2 GiB misses by 8 MiB, and the text says so."""
    mimo = model("mimo-vl", 14.0, overhead_gib=2.0, prio=100)
    result = placement.plan([mimo], inventory("lab_2x4070tis"))
    assert "gpu0 has only 16376 MiB (< 16384 MiB) usable in total" in result.pending[0].reason


def test_reason_names_foreign_pids_and_lost_gpus() -> None:
    """The brief's example: lost gpu0, gpu1 shared with a specialist and a foreign process."""
    snapshot = host(16384, 16384, lost=(0,))
    gpu1 = dataclasses.replace(
        snapshot.gpus[1], used_mib=205, processes=(GpuProcess(4242, 205, "python"),)
    )
    snapshot = dataclasses.replace(snapshot, gpus=(snapshot.gpus[0], gpu1))
    models = [model("mimo-vl", 16.0, prio=100), model("deepcoder:14b", 9.0, prio=100)]
    result = placement.plan(models, snapshot)
    assert where(result) == {"deepcoder:14b": [1]}
    assert result.pending[0].reason == (
        "mimo-vl needs 16.0 GiB; gpu0 is lost: GPU is lost; "
        "gpu1 has 6.8 GiB free (deepcoder:14b 9.0 GiB, pid 4242 not ours 0.2 GiB)"
    )


def test_higher_priority_preempts_lower_and_the_evicted_land_elsewhere() -> None:
    models = [
        model("mimo", 12.0, prio=100),
        model("coder", 8.0, prio=50),
        model("small", 4.0, prio=10),
    ]
    # gpu0 12 GiB, gpu1 16 GiB: mimo only fits gpu1... best fit puts it on gpu0 (exact)
    result = placement.plan(models, host(12 * 1024, 16 * 1024))
    assert where(result) == {"mimo": [0], "coder": [1], "small": [1]}
    # now gpu0 is lost: mimo must evict from gpu1; coder (50) survives only if room remains
    lost = placement.plan(
        models,
        host(12 * 1024, 16 * 1024, lost=(0,)),
        current=[
            CurrentReplica("mimo", 0, "GPU-00000000-0000-0000-0000-000000000000"),
            CurrentReplica("coder", 0, "GPU-00000001-0000-0000-0000-000000000000"),
            CurrentReplica("small", 0, "GPU-00000001-0000-0000-0000-000000000000"),
        ],
    )
    assert where(lost) == {"mimo": [1], "small": [1]}
    assert [p.model for p in lost.pending] == ["coder"]
    assert lost.pending[0].reason.startswith("evicted from gpu1 by mimo (priority 100 > 50)")
    causes = {s.model: s.cause for s in lost.stops}
    assert causes == {"mimo": StopCause.MOVED, "coder": StopCause.PREEMPTED}
    mimo = lost.placements_for("mimo")[0]
    assert mimo.moved_from == "GPU-00000000-0000-0000-0000-000000000000"
    assert not mimo.kept


def test_equal_priority_never_preempts() -> None:
    models = [model("a", 10.0, prio=5), model("b", 10.0, prio=5)]
    result = placement.plan(models, host(16 * 1024))
    assert where(result) == {"a": [0]}
    assert "even after evicting" not in result.pending[0].reason


def test_running_replica_is_not_moved_without_cause() -> None:
    """Stability: a replica on a non-preferred GPU stays where it runs."""
    spec = model("m", 4.0, preferred_gpus=(0,))
    gpu1 = "GPU-00000001-0000-0000-0000-000000000000"
    result = placement.plan([spec], host(16384, 16384), current=[CurrentReplica("m", 0, gpu1)])
    [p] = result.placements
    assert (p.gpu_index, p.kept, p.moved_from) == (1, True, None)
    assert result.stops == ()


def test_preferred_gpu_wins_for_new_replicas() -> None:
    result = placement.plan([model("m", 4.0, preferred_gpus=(1,))], host(16384, 16384))
    assert where(result) == {"m": [1]}


def test_replicas_spread_one_per_gpu() -> None:
    result = placement.plan([model("m", 4.0, replicas=3)], host(16384, 16384))
    assert where(result) == {"m": [0, 1]}
    assert result.pending[0].replica == 2
    assert "gpu0 already runs a replica of m" in result.pending[0].reason


def test_scale_override_and_scale_down_stops_highest_replica() -> None:
    spec = model("m", 4.0, replicas=2)
    uuids = [g.uuid for g in host(16384, 16384).gpus]
    current = [CurrentReplica("m", 0, uuids[0]), CurrentReplica("m", 1, uuids[1])]
    result = placement.plan(
        [spec], host(16384, 16384), current=current, overrides=Overrides(replicas={"m": 1})
    )
    assert where(result) == {"m": [0]}
    [stop] = result.stops
    assert (stop.replica, stop.cause, stop.detail) == (
        1,
        StopCause.SCALED_DOWN,
        "scaled to 1 replica",
    )


def test_removed_model_is_stopped() -> None:
    uuid = host(16384).gpus[0].uuid
    result = placement.plan([], host(16384), current=[CurrentReplica("gone", 0, uuid)])
    assert [(s.model, s.cause) for s in result.stops] == [("gone", StopCause.REMOVED)]


def test_allowed_gpus_by_index_and_uuid() -> None:
    snapshot = host(16384, 16384)
    by_uuid = model("u", 4.0, allowed_gpus=(snapshot.gpus[1].uuid,))
    by_index = model("i", 4.0, allowed_gpus=(1,))
    nowhere = model("n", 4.0, allowed_gpus=(7,))
    result = placement.plan([by_uuid, by_index, nowhere], snapshot)
    assert where(result) == {"u": [1], "i": [1]}
    assert result.pending[0].reason.endswith("none of allowed_gpus (7) exists on this host")


def test_cordoned_gpu_keeps_what_runs_but_takes_nothing_new() -> None:
    snapshot = host(16384, 16384)
    gpu0 = snapshot.gpus[0].uuid
    result = placement.plan(
        [model("old", 4.0), model("new", 4.0, preferred_gpus=(0,))],
        snapshot,
        current=[CurrentReplica("old", 0, gpu0)],
        overrides=Overrides(cordoned=frozenset({gpu0})),
    )
    assert where(result) == {"old": [0], "new": [1]}
    assert result.gpus[0].status == "cordoned"


def test_drained_gpu_moves_everything_off() -> None:
    snapshot = host(16384, 16384)
    gpu0 = snapshot.gpus[0].uuid
    result = placement.plan(
        [model("m", 4.0)],
        snapshot,
        current=[CurrentReplica("m", 0, gpu0)],
        overrides=Overrides(drained=frozenset({gpu0})),
    )
    assert where(result) == {"m": [1]}
    assert result.stops[0].cause is StopCause.MOVED
    assert "drained by an operator" in result.stops[0].detail


def test_foreign_memory_and_config_reservation_shrink_capacity() -> None:
    snapshot = inventory("mixed_4090_3060")
    # 4090: 24564 - 348 reserved - 612 used by the desktop = 23604; minus 1024 reserved by config
    result = placement.plan(
        [model("big", 22.5)],
        snapshot,
        reserved_mib={snapshot.gpus[0].uuid: 1024},
    )
    assert result.placements == ()
    reason = result.pending[0].reason
    assert "gpu0 has 22.1 GiB free (pid 1893 not ours 0.4 GiB, pid 2240 not ours 0.2 GiB" in reason
    assert "held outside any listed process" in reason  # 612 used, 592 listed


def test_our_own_processes_are_not_foreign() -> None:
    snapshot = host(16384)
    gpu = dataclasses.replace(
        snapshot.gpus[0], used_mib=15000, processes=(GpuProcess(100, 15000, "VLLM::EngineCore"),)
    )
    snapshot = dataclasses.replace(snapshot, gpus=(gpu,))
    current = [CurrentReplica("m", 0, gpu.uuid, pids=frozenset({99, 100}))]
    result = placement.plan([model("m", 15.0)], snapshot, current=current)
    assert result.placements[0].kept
    assert result.gpus[0].foreign_mib == 0


def test_replica_that_no_longer_fits_moves_when_foreign_memory_grows() -> None:
    snapshot = host(16384, 16384)
    gpu0 = dataclasses.replace(
        snapshot.gpus[0], used_mib=8192, processes=(GpuProcess(555, 8192, "intruder"),)
    )
    snapshot = dataclasses.replace(snapshot, gpus=(gpu0, snapshot.gpus[1]))
    result = placement.plan(
        [model("m", 10.0)], snapshot, current=[CurrentReplica("m", 0, gpu0.uuid)]
    )
    assert where(result) == {"m": [1]}
    assert "no longer fits on gpu0" in result.stops[0].detail


def test_degraded_gpu_keeps_running_work_but_takes_no_new() -> None:
    snapshot = inventory("h100x8")
    models = [model(f"m{i}", 70.0, prio=i) for i in range(8)]
    result = placement.plan(models, snapshot)
    used = {p.gpu_index for p in result.placements}
    assert 3 not in used  # lost
    assert 5 not in used  # a foreign training job leaves only 10 GiB
    assert len(result.placements) == 6
    assert [p.model for p in result.pending] == ["m1", "m0"]  # lowest priorities lose
    assert "gpu3 is lost: GPU is lost" in result.pending[0].reason
    assert "pid 77001 not ours 68.5 GiB" in result.pending[0].reason


def test_no_gpus_at_all() -> None:
    result = placement.plan([model("m", 1.0)], host())
    assert result.pending[0].reason == "m needs 1.0 GiB; no GPUs were found"


@pytest.mark.parametrize(
    ("budgets_gib", "expected"),
    [
        ((8.0, 8.0), {"a": [0], "b": [0]}),  # both fit one card: best fit packs them
        ((12.0, 8.0), {"a": [0], "b": [1]}),
        ((16.0, 16.0), {"a": [0], "b": [1]}),
        ((16.0, 16.5), {"a": [0]}),
    ],
)
def test_packing_table(budgets_gib: tuple[float, float], expected: dict[str, list[int]]) -> None:
    models = [model("a", budgets_gib[0], prio=2), model("b", budgets_gib[1], prio=1)]
    assert where(placement.plan(models, host(16384, 16384))) == expected
