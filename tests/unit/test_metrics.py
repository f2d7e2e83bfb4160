"""FleetMetrics: real snapshots and events in, Prometheus text out (parsed, not grepped)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from fleetd.model.gpu import GpuHealth, GpuProcess, GpuSnapshot, HostSnapshot
from fleetd.model.worker import WorkerState, WorkerStatus
from fleetd.obs.events import Event, EventBus
from fleetd.obs.metrics import FleetMetrics, follow_events
from fleetd.planning.types import GpuPlan, Pending, Placement, Plan
from fleetd.testing import ManualClock, settle

MIB = 1024 * 1024
UUID0 = "GPU-00000000-0000-0000-0000-000000000000"
UUID1 = "GPU-11111111-1111-1111-1111-111111111111"


@dataclass
class View:
    """A reconciler as metrics see it, holding real fleetd data."""

    host: HostSnapshot | None = None
    plan: Plan | None = None
    passes: int = 0
    vram_mib: dict[str, int] = field(default_factory=dict)
    statuses: list[WorkerStatus] = field(default_factory=list)
    pids: dict[int, str] = field(default_factory=dict)

    def workers(self) -> Sequence[WorkerStatus]:
        return self.statuses

    def our_pids(self) -> Mapping[int, str]:
        return self.pids


def gpu(
    index: int,
    uuid: str,
    *,
    used_mib: int,
    processes: tuple[GpuProcess, ...] = (),
    health: GpuHealth = GpuHealth.HEALTHY,
) -> GpuSnapshot:
    total, reserved = 81559, 512
    return GpuSnapshot(
        index=index,
        uuid=uuid,
        name="NVIDIA H100 80GB HBM3",
        total_mib=total,
        reserved_mib=reserved,
        used_mib=used_mib,
        free_mib=total - reserved - used_mib,
        processes=processes,
        utilization_pct=37,
        temperature_c=54,
        power_w=312.5,
        health=health,
    )


def worker(
    name: str,
    state: WorkerState,
    *,
    engine: str = "vllm",
    gpu_index: int = 0,
    since_s: float = 0.0,
    models: tuple[str, ...] | None = None,
    budget_mib: int = 16384,
) -> WorkerStatus:
    return WorkerStatus(
        name=name,
        engine=engine,
        gpu_uuid=UUID1 if gpu_index else UUID0,
        gpu_index=gpu_index,
        state=state,
        reason="test",
        port=18100,
        pid=4242,
        restarts=0,
        since_s=since_s,
        models=(name.partition("#")[0],) if models is None else models,
        budget_mib=budget_mib,
    )


def placement(model: str, replica: int = 0, *, gpu_index: int = 0) -> Placement:
    return Placement(
        model=model,
        replica=replica,
        gpu_uuid=UUID1 if gpu_index else UUID0,
        gpu_index=gpu_index,
        budget_mib=16384,
        priority=50,
        kept=True,
    )


def plan(*placements: Placement, pending: tuple[Pending, ...] = ()) -> Plan:
    gpus = tuple(
        GpuPlan(
            uuid=u,
            index=i,
            name="NVIDIA H100 80GB HBM3",
            health=GpuHealth.HEALTHY,
            status="ok",
            usable_mib=81047,
            foreign_mib=0,
            foreign=(),
            committed_mib=0,
        )
        for i, u in enumerate((UUID0, UUID1))
    )
    return Plan(placements=placements, pending=pending, stops=(), gpus=gpus)


def state_changed(name: str, old: WorkerState, new: WorkerState, **extra: object) -> Event:
    fields: dict[str, object] = {
        "worker": name,
        "engine": "vllm",
        "gpu": 0,
        "old": old.value,
        "new": new.value,
        "reason": "test",
        **extra,
    }
    return Event("worker.state_changed", f"{name}: {old} -> {new}", fields=fields)


def samples(metrics: FleetMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = metrics.render().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: FleetMetrics, metric: str, /, **labels: str) -> float:
    """The one sample called ``metric`` whose labels include ``labels``."""
    found = [
        v
        for (n, lbl), v in samples(metrics).items()
        if n == metric and set(labels.items()) <= set(lbl)
    ]
    assert len(found) == 1, f"{metric}{labels}: {len(found)} samples"
    return found[0]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=1000.0)


@pytest.fixture
def fleet() -> View:
    """Two GPUs: gpu0 runs mimo-vl (ours, pid 100) beside a foreign pid; gpu1 is degraded."""
    host = HostSnapshot(
        gpus=(
            gpu(
                0,
                UUID0,
                used_mib=20480,
                processes=(GpuProcess(100, 16384, "vllm"), GpuProcess(999, 4096, "python")),
            ),
            gpu(1, UUID1, used_mib=0, health=GpuHealth.DEGRADED),
        )
    )
    pending = (Pending("big", 0, 90000, 10, "needs 87.9 GiB"),)
    return View(
        host=host,
        plan=plan(placement("mimo-vl"), placement("mimo-vl", 1, gpu_index=1), pending=pending),
        passes=7,
        vram_mib={"mimo-vl#0": 16384},
        statuses=[
            worker("mimo-vl#0", WorkerState.READY, since_s=940.0),
            worker("mimo-vl#1", WorkerState.STARTING, gpu_index=1),
        ],
        pids={100: "mimo-vl#0"},
    )


def test_exposition_parses_and_names_follow_conventions(fleet: View, clock: ManualClock) -> None:
    """Every family parses, carries the fleetd_ prefix, and counters expose _total samples."""
    metrics = FleetMetrics(clock=clock.monotonic)
    metrics.refresh(fleet)
    metrics.observe_event(Event("gpu.xid", "xid", fields={"gpu_uuid": UUID0, "xid": 79}))
    families = list(text_string_to_metric_families(metrics.render().decode()))
    names = {f.name for f in families}
    assert {
        "fleetd_gpu_memory_total_bytes",
        "fleetd_gpu_memory_used_bytes",
        "fleetd_gpu_memory_ours_bytes",
        "fleetd_gpu_memory_foreign_bytes",
        "fleetd_gpu_memory_free_bytes",
        "fleetd_gpu_utilization_ratio",
        "fleetd_gpu_temperature_celsius",
        "fleetd_gpu_power_watts",
        "fleetd_gpu_health",
        "fleetd_gpu_xid_events",
        "fleetd_worker_state",
        "fleetd_worker_restarts",
        "fleetd_worker_vram_bytes",
        "fleetd_worker_vram_budget_bytes",
        "fleetd_worker_ready_seconds",
        "fleetd_model_replicas_ready",
        "fleetd_model_replicas_wanted",
        "fleetd_model_replicas_pending",
        "fleetd_model_availability_ratio",
        "fleetd_model_availability_target",
        "fleetd_reconcile_duration_seconds",
        "fleetd_reconcile",
        "fleetd_events",
        "fleetd_alert_deliveries",
    } <= names
    for family in families:
        assert family.name.startswith("fleetd_")
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)


def test_metrics_live_in_their_own_registry(fleet: View) -> None:
    """Nothing lands in the global registry, so two instances (tests, reloads) never clash."""
    first, second = FleetMetrics(), FleetMetrics()
    first.refresh(fleet)
    second.refresh(fleet)
    assert first.registry is not second.registry
    assert not [m for m in REGISTRY.collect() if m.name.startswith("fleetd_")]


def test_gpu_memory_is_in_bytes_and_split_ours_foreign(fleet: View) -> None:
    metrics = FleetMetrics()
    metrics.refresh(fleet)
    gpu0 = {"gpu": "0", "uuid": UUID0, "name": "NVIDIA H100 80GB HBM3"}
    assert value(metrics, "fleetd_gpu_memory_total_bytes", **gpu0) == 81559 * MIB
    assert value(metrics, "fleetd_gpu_memory_used_bytes", **gpu0) == 20480 * MIB
    assert value(metrics, "fleetd_gpu_memory_ours_bytes", **gpu0) == 16384 * MIB
    assert value(metrics, "fleetd_gpu_memory_foreign_bytes", **gpu0) == 4096 * MIB
    assert value(metrics, "fleetd_gpu_memory_free_bytes", **gpu0) == (81559 - 512 - 20480) * MIB
    assert value(metrics, "fleetd_gpu_utilization_ratio", **gpu0) == pytest.approx(0.37)
    assert value(metrics, "fleetd_gpu_temperature_celsius", **gpu0) == 54
    assert value(metrics, "fleetd_gpu_power_watts", **gpu0) == 312.5
    assert value(metrics, "fleetd_worker_vram_bytes", worker="mimo-vl#0") == 16384 * MIB
    assert value(metrics, "fleetd_worker_vram_budget_bytes", worker="mimo-vl#1") == 16384 * MIB


def test_unknown_readings_are_left_out_not_zero() -> None:
    """A GPU whose NVML does not report power or temperature has no such series."""
    bare = GpuSnapshot(0, UUID0, "GPU", 1000, 0, 0, 1000)
    metrics = FleetMetrics()
    metrics.refresh(View(host=HostSnapshot(gpus=(bare,))))
    names = {name for name, _ in samples(metrics)}
    assert "fleetd_gpu_memory_total_bytes" in names
    assert not names & {"fleetd_gpu_power_watts", "fleetd_gpu_temperature_celsius"}


def test_gpu_health_is_one_hot(fleet: View) -> None:
    metrics = FleetMetrics()
    metrics.refresh(fleet)
    for uuid, current in ((UUID0, "healthy"), (UUID1, "degraded")):
        for state in GpuHealth:
            expected = 1.0 if state.value == current else 0.0
            assert value(metrics, "fleetd_gpu_health", uuid=uuid, state=state.value) == expected


def test_worker_state_is_one_hot_with_worker_labels(fleet: View) -> None:
    metrics = FleetMetrics()
    metrics.refresh(fleet)
    series = {
        dict(lbl)["state"]: v
        for (name, lbl), v in samples(metrics).items()
        if name == "fleetd_worker_state" and dict(lbl)["worker"] == "mimo-vl#1"
    }
    assert series == {s.value: float(s is WorkerState.STARTING) for s in WorkerState}
    labels = {"worker": "mimo-vl#1", "engine": "vllm", "gpu": "1", "model": "mimo-vl"}
    assert value(metrics, "fleetd_worker_state", state="starting", **labels) == 1.0


def test_ready_seconds_count_time_in_ready_and_reset(fleet: View, clock: ManualClock) -> None:
    metrics = FleetMetrics(clock=clock.monotonic)
    metrics.refresh(fleet)
    assert value(metrics, "fleetd_worker_ready_seconds", worker="mimo-vl#0") == 60.0
    assert value(metrics, "fleetd_worker_ready_seconds", worker="mimo-vl#1") == 0.0
    fleet.statuses[0] = worker("mimo-vl#0", WorkerState.BACKOFF, since_s=1000.0)
    metrics.refresh(fleet)
    assert value(metrics, "fleetd_worker_ready_seconds", worker="mimo-vl#0") == 0.0


def test_replica_counts_per_model(fleet: View) -> None:
    metrics = FleetMetrics(availability_target=0.995)
    metrics.refresh(fleet)
    assert value(metrics, "fleetd_model_replicas_ready", model="mimo-vl") == 1
    assert value(metrics, "fleetd_model_replicas_wanted", model="mimo-vl") == 2
    assert value(metrics, "fleetd_model_replicas_pending", model="mimo-vl") == 0
    assert value(metrics, "fleetd_model_replicas_wanted", model="big") == 1
    assert value(metrics, "fleetd_model_replicas_pending", model="big") == 1
    assert value(metrics, "fleetd_model_availability_target", model="mimo-vl") == 0.995


def test_availability_999_of_1000_seconds(clock: ManualClock) -> None:
    """Wanted at t=0, READY from t=1 to t=1000: 0.999."""
    metrics = FleetMetrics(clock=clock.monotonic)
    view = View(plan=plan(placement("m")), statuses=[worker("m", WorkerState.STARTING)])
    metrics.refresh(view)  # t=1000: first wanted
    clock.now += 1
    metrics.observe_event(state_changed("m", WorkerState.STARTING, WorkerState.READY))
    clock.now += 999
    assert value(metrics, "fleetd_model_availability_ratio", model="m") == pytest.approx(0.999)
    assert value(metrics, "fleetd_model_wanted_seconds_total", model="m") == pytest.approx(1000)
    assert value(metrics, "fleetd_model_available_seconds_total", model="m") == pytest.approx(999)


def test_availability_counts_outages_from_events(clock: ManualClock) -> None:
    """Ready 100 s, down 50 s (crash), ready 50 s: 150 of 200 s."""
    metrics = FleetMetrics(clock=clock.monotonic)
    metrics.observe_event(state_changed("m", WorkerState.STOPPED, WorkerState.READY))
    clock.now += 100
    metrics.observe_event(state_changed("m", WorkerState.READY, WorkerState.BACKOFF))
    clock.now += 50
    metrics.observe_event(state_changed("m", WorkerState.BACKOFF, WorkerState.STARTING))
    metrics.observe_event(state_changed("m", WorkerState.STARTING, WorkerState.READY))
    clock.now += 50
    assert value(metrics, "fleetd_model_availability_ratio", model="m") == pytest.approx(0.75)


def test_availability_holds_while_one_of_two_replicas_is_ready(clock: ManualClock) -> None:
    metrics = FleetMetrics(clock=clock.monotonic)
    metrics.observe_event(state_changed("m#0", WorkerState.STOPPED, WorkerState.READY))
    metrics.observe_event(state_changed("m#1", WorkerState.STOPPED, WorkerState.READY))
    clock.now += 10
    metrics.observe_event(state_changed("m#0", WorkerState.READY, WorkerState.BACKOFF))
    clock.now += 10
    assert value(metrics, "fleetd_model_availability_ratio", model="m") == 1.0


def test_time_not_wanted_does_not_count(clock: ManualClock) -> None:
    """Scaled to zero for 100 s: those seconds count neither for nor against the model."""
    metrics = FleetMetrics(clock=clock.monotonic)
    ready = View(plan=plan(placement("m")), statuses=[worker("m", WorkerState.READY)])
    metrics.refresh(ready)
    clock.now += 100
    metrics.refresh(View(plan=plan(), statuses=[worker("m", WorkerState.STOPPED)]))
    clock.now += 100
    metrics.refresh(View(plan=plan(placement("m")), statuses=[worker("m", WorkerState.STOPPED)]))
    clock.now += 100
    assert value(metrics, "fleetd_model_wanted_seconds_total", model="m") == pytest.approx(200)
    assert value(metrics, "fleetd_model_availability_ratio", model="m") == pytest.approx(0.5)


def test_a_missed_event_is_repaired_by_the_next_scrape(clock: ManualClock) -> None:
    """The bus drops events for a slow subscriber; the snapshot says who is READY now."""
    metrics = FleetMetrics(clock=clock.monotonic)
    metrics.observe_event(state_changed("m", WorkerState.STOPPED, WorkerState.STARTING))
    clock.now += 10
    metrics.refresh(View(plan=plan(placement("m")), statuses=[worker("m", WorkerState.READY)]))
    clock.now += 30
    assert value(metrics, "fleetd_model_availability_ratio", model="m") == pytest.approx(0.75)


def test_xid_events_are_counted_per_gpu_and_xid(fleet: View) -> None:
    metrics = FleetMetrics()
    for xid in (79, 79, 13):
        metrics.observe_event(Event("gpu.xid", "xid", fields={"gpu_uuid": UUID1, "xid": xid}))
    metrics.refresh(fleet)  # the GPU's index and name come from the snapshot
    gpu1 = {"gpu": "1", "uuid": UUID1, "name": "NVIDIA H100 80GB HBM3"}
    assert value(metrics, "fleetd_gpu_xid_events_total", xid="79", **gpu1) == 2
    assert value(metrics, "fleetd_gpu_xid_events_total", xid="13", **gpu1) == 1


def test_restarts_by_reason(fleet: View) -> None:
    metrics = FleetMetrics()
    metrics.refresh(fleet)
    name = "mimo-vl#0"

    def crashed(why: str) -> Event:
        return Event("worker.crashed", f"{name}: {why}", fields={"worker": name, "delay_s": 2.0})

    metrics.observe_event(crashed("exited with code 1"))
    metrics.observe_event(crashed("exited with code -9 while starting"))
    metrics.observe_event(Event("worker.hung", f"{name}: hung", fields={"worker": name}))
    metrics.observe_event(state_changed(name, WorkerState.READY, WorkerState.STOPPING))
    metrics.observe_event(state_changed(name, WorkerState.STOPPING, WorkerState.BACKOFF))
    metrics.observe_event(crashed("hung: 3 health probes failed in a row (timeout)"))
    metrics.observe_event(crashed("not healthy within start_timeout_s=600 (connection refused)"))
    metrics.observe_event(Event("operator.restart", "restart", fields={"worker": name}))
    labels = {"worker": name, "engine": "vllm", "gpu": "0", "model": "mimo-vl"}
    got = {
        r: value(metrics, "fleetd_worker_restarts_total", reason=r, **labels)
        for r in ("exit", "hang", "start_timeout", "operator")
    }
    assert got == {"exit": 2, "hang": 1, "start_timeout": 1, "operator": 1}
    assert value(metrics, "fleetd_worker_restarts_total", worker="mimo-vl#1", reason="exit") == 0


def test_a_hang_that_ends_in_failed_does_not_tag_the_next_crash(clock: ManualClock) -> None:
    metrics = FleetMetrics(clock=clock.monotonic)
    metrics.observe_event(Event("worker.hung", "m: hung", fields={"worker": "m"}))
    metrics.observe_event(state_changed("m", WorkerState.READY, WorkerState.FAILED))
    metrics.observe_event(
        Event("worker.crashed", "m: exited with code 1", fields={"worker": "m", "delay_s": 1.0})
    )
    assert value(metrics, "fleetd_worker_restarts_total", worker="m", reason="exit") == 1
    assert value(metrics, "fleetd_worker_restarts_total", worker="m", reason="hang") == 0


def test_ollama_slot_vram_comes_from_its_ready_event(clock: ManualClock) -> None:
    metrics = FleetMetrics(clock=clock.monotonic)
    slot = worker("deepcoder:14b", WorkerState.READY, engine="ollama", budget_mib=12288)
    serve = worker("ollama@gpu0", WorkerState.READY, engine="ollama", models=(), budget_mib=0)
    metrics.observe_event(
        state_changed("deepcoder:14b", WorkerState.STARTING, WorkerState.READY, vram_mib=11000)
    )
    metrics.refresh(View(statuses=[serve, slot]))
    assert value(metrics, "fleetd_worker_vram_bytes", worker="deepcoder:14b") == 11000 * MIB
    assert value(metrics, "fleetd_worker_state", worker="ollama@gpu0", state="ready") == 1
    assert value(metrics, "fleetd_worker_state", worker="ollama@gpu0", model="", state="ready")
    assert "ollama@gpu0" not in {
        dict(lbl).get("model") for (n, lbl) in samples(metrics) if n.startswith("fleetd_model_")
    }


def test_reconcile_duration_and_results(fleet: View) -> None:
    metrics = FleetMetrics()
    metrics.observe_reconcile(0.02, ok=True)
    metrics.observe_reconcile(0.3, ok=True)
    metrics.observe_reconcile(7.0, ok=False)
    metrics.observe_event(Event("reconcile.error", "reconcile pass failed: boom"))
    metrics.refresh(fleet)  # 7 passes completed
    name = "fleetd_reconcile_duration_seconds"
    assert value(metrics, f"{name}_count", result="ok") == 2
    assert value(metrics, f"{name}_sum", result="ok") == pytest.approx(0.32)
    assert value(metrics, f"{name}_bucket", result="ok", le="0.025") == 1
    assert value(metrics, f"{name}_bucket", result="error", le="5.0") == 0
    assert value(metrics, f"{name}_bucket", result="error", le="10.0") == 1
    assert value(metrics, "fleetd_reconcile_total", result="ok") == 7
    assert value(metrics, "fleetd_reconcile_total", result="error") == 1


def test_events_and_alert_deliveries_are_counted() -> None:
    metrics = FleetMetrics()
    for kind in ("gpu.lost", "gpu.lost", "operator.cordon"):
        metrics.observe_event(Event(kind, kind))
    metrics.count_alert("pager", "ok")
    metrics.count_alert("pager", "error")
    metrics.count_alert("pager", "error")
    assert value(metrics, "fleetd_events_total", kind="gpu.lost") == 2
    assert value(metrics, "fleetd_events_total", kind="operator.cordon") == 1
    assert value(metrics, "fleetd_alert_deliveries_total", hook="pager", result="error") == 2


def test_alert_series_can_be_created_before_any_delivery() -> None:
    metrics = FleetMetrics()
    metrics.init_alert_series(["pager", "exec:/bin/true"], ["ok", "failed"])
    metrics.count_alert("pager", "ok")
    deliveries = {
        (dict(lbl)["hook"], dict(lbl)["result"]): v
        for (n, lbl), v in samples(metrics).items()
        if n == "fleetd_alert_deliveries_total"
    }
    assert deliveries == {
        ("pager", "ok"): 1,
        ("pager", "failed"): 0,
        ("exec:/bin/true", "ok"): 0,
        ("exec:/bin/true", "failed"): 0,
    }


async def test_follow_events_feeds_the_bus_until_cancelled() -> None:
    bus, metrics = EventBus(), FleetMetrics()
    task = asyncio.create_task(follow_events(bus, metrics))
    await settle()
    bus.emit("gpu.xid", "GPU x: xid 79", gpu_uuid=UUID0, xid=79)
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert value(metrics, "fleetd_gpu_xid_events_total", xid="79") == 1
    assert value(metrics, "fleetd_metrics_events_dropped_total") == 0
    assert not bus._subs  # the subscription was closed


def test_promtool_accepts_the_exposition(fleet: View, clock: ManualClock) -> None:
    """`promtool check metrics` lints names, units, types (scripts/system_deps.sh installs it)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found: run scripts/system_deps.sh as root (Debian: prometheus)")
    metrics = FleetMetrics(clock=clock.monotonic)
    metrics.refresh(fleet)
    metrics.observe_event(Event("gpu.xid", "xid", fields={"gpu_uuid": UUID0, "xid": 79}))
    metrics.observe_reconcile(0.1, ok=True)
    metrics.count_alert("pager", "ok")
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=metrics.render(),
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_events_follow_the_live_plan_between_scrapes(clock: ManualClock) -> None:
    """Scaled to zero and stopped with no scrape in between: the stop ends the wanted time."""
    metrics = FleetMetrics(clock=clock.monotonic)
    view = View(plan=plan(placement("m")), statuses=[worker("m", WorkerState.READY)])
    metrics.refresh(view)
    clock.now += 100
    view.plan = plan()  # the reconciler's next pass no longer wants m
    metrics.observe_event(state_changed("m", WorkerState.READY, WorkerState.STOPPING))
    clock.now += 100
    assert value(metrics, "fleetd_model_wanted_seconds_total", model="m") == pytest.approx(100)
    assert value(metrics, "fleetd_model_availability_ratio", model="m") == 1.0


def test_a_model_nobody_wants_gets_no_availability_series(clock: ManualClock) -> None:
    """The last worker of a model removed from the config stops: no ratio stuck at 0."""
    metrics = FleetMetrics(clock=clock.monotonic)
    metrics.refresh(View(plan=plan(placement("a"))))
    metrics.observe_event(state_changed("old", WorkerState.READY, WorkerState.STOPPING))
    clock.now += 60
    models = {dict(lbl).get("model") for n, lbl in samples(metrics) if n.startswith("fleetd_model")}
    assert models == {"a"}


def test_a_stopped_worker_holds_no_vram(fleet: View) -> None:
    """The reconciler keeps the last VRAM reading of an exited worker; metrics say 0."""
    metrics = FleetMetrics()
    fleet.statuses[0] = worker("mimo-vl#0", WorkerState.BACKOFF)
    metrics.refresh(fleet)
    assert value(metrics, "fleetd_worker_vram_bytes", worker="mimo-vl#0") == 0
