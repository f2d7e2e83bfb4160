"""The GPU fault policy as a pure state machine: debounce, fault cordons, failback, flapping."""

from __future__ import annotations

from fleetd.model.gpu import GpuHealth, GpuSnapshot, HostSnapshot
from fleetd.planning.gpu_faults import Change, FaultPolicy, GpuFaults

UUID = "GPU-0"


def host(health: GpuHealth, reason: str = "") -> HostSnapshot:
    gpu = GpuSnapshot(
        index=0,
        uuid=UUID,
        name="sim",
        total_mib=16384,
        reserved_mib=0,
        used_mib=0,
        free_mib=16384,
        health=health,
        health_reason=reason,
    )
    return HostSnapshot(gpus=(gpu,), driver_version="x", backend="test")


class Driver:
    """Feeds observations; keeps the fault cordon as the daemon would (persisted set)."""

    def __init__(self, policy: FaultPolicy) -> None:
        self.faults = GpuFaults(policy)
        self.cordoned: set[str] = set()
        self.log: list[str] = []

    def see(self, health: GpuHealth, at_s: float, reason: str = "") -> GpuHealth:
        seen, changes = self.faults.observe(
            host(health, reason), at_s, fault_cordoned=self.cordoned
        )
        for change in changes:
            self.apply(change)
        return seen.gpus[0].health

    def apply(self, change: Change) -> None:
        self.log.append(change.kind if change.kind != "health" else f"health:{change.new.value}")
        if change.kind == "cordon":
            self.cordoned.add(change.uuid)
        elif change.kind == "uncordon":
            self.cordoned.discard(change.uuid)


POLICY = FaultPolicy(debounce_s=2.0, failback="auto", failback_after_s=60.0, max_moves=3)


def test_a_blip_shorter_than_the_debounce_changes_nothing() -> None:
    d = Driver(POLICY)
    assert d.see(GpuHealth.HEALTHY, 0) is GpuHealth.HEALTHY
    assert d.see(GpuHealth.LOST, 1.0, "NVML timeout") is GpuHealth.HEALTHY
    assert d.see(GpuHealth.LOST, 2.5) is GpuHealth.HEALTHY  # lost since 1.0: 1.5 s < 2 s
    assert d.see(GpuHealth.HEALTHY, 2.9) is GpuHealth.HEALTHY
    assert d.see(GpuHealth.HEALTHY, 10) is GpuHealth.HEALTHY
    assert d.log == []


def test_lost_for_the_debounce_cordons_then_auto_failback_after_hysteresis() -> None:
    d = Driver(POLICY)
    d.see(GpuHealth.HEALTHY, 0)
    d.see(GpuHealth.LOST, 1, "XID 79")
    assert d.see(GpuHealth.LOST, 3) is GpuHealth.LOST
    assert d.log == ["health:lost", "cordon"]
    assert UUID in d.cordoned
    d.see(GpuHealth.HEALTHY, 10)
    assert d.see(GpuHealth.HEALTHY, 12) is GpuHealth.HEALTHY  # healthy from 12 on
    assert "held after a fault: failback once healthy for 60 s more" in d.faults.describe(UUID, 12)
    assert d.faults.next_check_s(12, d.cordoned) == 60
    d.see(GpuHealth.HEALTHY, 71)
    assert UUID in d.cordoned  # 59 s
    d.see(GpuHealth.HEALTHY, 72)
    assert UUID not in d.cordoned
    assert d.log[-1] == "uncordon"
    assert d.faults.next_check_s(72, d.cordoned) is None


def test_losing_it_again_restarts_the_hysteresis() -> None:
    d = Driver(POLICY)
    d.see(GpuHealth.LOST, 0)  # first sight of a lost GPU: no debounce, cordoned
    assert d.log == ["cordon"]
    d.see(GpuHealth.HEALTHY, 1)
    d.see(GpuHealth.HEALTHY, 3)  # healthy (effective) since 3
    d.see(GpuHealth.LOST, 40)
    d.see(GpuHealth.LOST, 42)  # lost again before 60 s of health
    d.see(GpuHealth.HEALTHY, 50)
    d.see(GpuHealth.HEALTHY, 52)
    d.see(GpuHealth.HEALTHY, 100)  # 48 s since 52: still held
    assert UUID in d.cordoned
    d.see(GpuHealth.HEALTHY, 112)
    assert UUID not in d.cordoned


def test_flapping_gpu_stays_cordoned_and_is_said_once() -> None:
    d = Driver(FaultPolicy(debounce_s=0, failback="auto", failback_after_s=1, max_moves=2))
    d.see(GpuHealth.HEALTHY, 0)
    d.see(GpuHealth.LOST, 1)
    d.see(GpuHealth.HEALTHY, 2)
    d.see(GpuHealth.HEALTHY, 4)  # failback
    assert UUID not in d.cordoned
    d.see(GpuHealth.LOST, 5)  # second move within the window
    d.see(GpuHealth.HEALTHY, 6)
    d.see(GpuHealth.HEALTHY, 100)
    d.see(GpuHealth.HEALTHY, 200)
    assert UUID in d.cordoned
    assert d.log.count("flapping") == 1
    assert "flapping" in d.faults.describe(UUID, 200)
    # the operator uncordons: counting starts again
    d.cordoned.discard(UUID)
    d.faults.forget_flapping(UUID)
    d.see(GpuHealth.LOST, 300)
    d.see(GpuHealth.HEALTHY, 301)
    d.see(GpuHealth.HEALTHY, 303)
    assert UUID not in d.cordoned


def test_manual_failback_never_lifts_the_cordon() -> None:
    d = Driver(FaultPolicy(debounce_s=0, failback="manual", failback_after_s=1))
    d.see(GpuHealth.HEALTHY, 0)
    d.see(GpuHealth.LOST, 1)
    d.see(GpuHealth.HEALTHY, 2)
    d.see(GpuHealth.HEALTHY, 1000)
    assert UUID in d.cordoned
    assert "fleetctl uncordon" in d.faults.describe(UUID, 1000)
    assert d.faults.next_check_s(1000, d.cordoned) is None


def test_degraded_is_reported_but_not_evacuated() -> None:
    d = Driver(POLICY)
    d.see(GpuHealth.HEALTHY, 0)
    d.see(GpuHealth.DEGRADED, 1, "3 uncorrectable ECC errors")
    assert d.see(GpuHealth.DEGRADED, 3) is GpuHealth.DEGRADED
    assert d.log == ["health:degraded"]
    assert d.cordoned == set()
