"""What fleetd knows about a GPU at one instant: the planner's view of the hardware.

Snapshots are frozen and built by a GPU backend (NVML or simulated); nothing here talks to
a device. Keys are NVML UUIDs (indices can change across reboots); the index is for display.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class GpuHealth(enum.StrEnum):
    """How usable a GPU is for placement.

    HEALTHY: place freely. DEGRADED: keep what runs, place nothing new (e.g. uncorrectable ECC
    errors, NVML timeouts, an XID that needs a reset soon). LOST: nothing runs there (fell off
    the bus, reset required, NVML cannot reach it).
    """

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    LOST = "lost"


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """A process holding memory on a GPU, as the driver reports it."""

    pid: int
    used_mib: int | None  # None when the driver does not report it (NVML_VALUE_NOT_AVAILABLE)
    name: str = ""


@dataclass(frozen=True, slots=True)
class GpuSnapshot:
    """One GPU at one instant.

    ``used_mib`` excludes ``reserved_mib`` (NVML memory v2 semantics, as nvidia-smi shows it),
    so ``total_mib == reserved_mib + used_mib + free_mib`` up to rounding.
    """

    index: int
    uuid: str
    name: str
    total_mib: int
    reserved_mib: int
    used_mib: int
    free_mib: int
    processes: tuple[GpuProcess, ...] = ()
    utilization_pct: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    ecc_uncorrected: int | None = None  # volatile count; None when ECC is off or unsupported
    health: GpuHealth = GpuHealth.HEALTHY
    health_reason: str = ""

    @property
    def label(self) -> str:
        """Short display name, e.g. ``gpu0``."""
        return f"gpu{self.index}"

    @property
    def usable_mib(self) -> int:
        """Memory a workload could ever get on this card: total minus the driver's reservation."""
        return self.total_mib - self.reserved_mib


@dataclass(frozen=True, slots=True)
class GpuEvent:
    """Something the driver reported between snapshots (an XID, an ECC error, loss of the GPU)."""

    uuid: str
    kind: GpuEventKind
    xid: int | None = None
    detail: str = ""


class GpuEventKind(enum.StrEnum):
    """Kinds of asynchronous GPU events."""

    XID = "xid"
    ECC_SINGLE_BIT = "ecc_single_bit"
    ECC_DOUBLE_BIT = "ecc_double_bit"
    LOST = "lost"


@dataclass(frozen=True, slots=True)
class HostSnapshot:
    """Every GPU on the host at one instant, plus what the backend could not read."""

    gpus: tuple[GpuSnapshot, ...]
    driver_version: str = ""
    backend: str = ""
    errors: tuple[str, ...] = field(default=())

    def by_uuid(self, uuid: str) -> GpuSnapshot | None:
        """The GPU with this UUID, or None."""
        return next((g for g in self.gpus if g.uuid == uuid), None)
