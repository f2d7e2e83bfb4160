"""The GPU backend boundary: how fleetd observes GPUs, whatever is underneath.

Two implementations: ``fleetd.runtime.nvml.NvmlBackend`` (real GPUs through NVML) and
``fleetd.sim.gpu.SimulatedGpuBackend`` (the simulated host used by the demo and the tests).
Both hand out frozen ``HostSnapshot``s and ``GpuEvent``s; neither ever blocks the event loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from fleetd.model.gpu import GpuEvent, HostSnapshot


class GpuBackend(Protocol):
    """Observes the host's GPUs."""

    name: str

    async def snapshot(self) -> HostSnapshot:
        """Every GPU now: memory, processes, sensors, health."""
        ...

    async def wait_events(self, timeout_s: float) -> list[GpuEvent]:
        """Events (XIDs, ECC, loss) since the last call; waits up to ``timeout_s`` for one."""
        ...

    async def aclose(self) -> None:
        """Release the backend (NVML shutdown, event sets freed)."""
        ...
