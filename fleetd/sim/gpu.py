"""GpuBackend over a simulated host directory (``fleetd.sim.host``).

It reports what the NVML backend would report on a real host with the same processes:
per-process memory from live claims, memory freed when a process dies, and injected faults
(lost GPU, uncorrectable ECC, XID events) mapped to health the same way.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fleetd.model import xid as xid_catalogue
from fleetd.model.gpu import (
    GpuEvent,
    GpuEventKind,
    GpuHealth,
    GpuProcess,
    GpuSnapshot,
    HostSnapshot,
)

if TYPE_CHECKING:
    from fleetd.sim.host import SimHost


class SimulatedGpuBackend:
    """Observes a ``SimHost``; all file reads happen in a worker thread."""

    name = "simulated"

    def __init__(self, host: SimHost, *, poll_interval_s: float = 0.25) -> None:
        self.host = host
        self._offset = host.events_end()
        self._poll_interval_s = poll_interval_s
        # sticky health from XIDs, as a real GPU stays broken until it is reset
        self._xid_health: dict[str, tuple[GpuHealth, str]] = {}
        self._unseen: list[GpuEvent] = []  # read by a snapshot, not yet returned as events

    async def snapshot(self) -> HostSnapshot:
        """Read the host now (events read on the way wait for ``wait_events``)."""
        self._unseen.extend(await self._consume_events())
        return await asyncio.to_thread(self._snapshot_sync)

    def _snapshot_sync(self) -> HostSnapshot:
        faults = self.host.faults()
        claims = self.host.claims()
        gpus = []
        for gpu in self.host.gpus():
            fault = faults.get(gpu.uuid, {})
            mine = [c for c in claims if c.uuid == gpu.uuid]
            used = sum(c.used_mib for c in mine)
            usable = gpu.total_mib - gpu.reserved_mib
            health, reason = self._xid_health.get(gpu.uuid, (GpuHealth.HEALTHY, ""))
            ecc = int(fault.get("ecc_uncorrected", 0))
            if fault.get("lost"):
                health, reason = GpuHealth.LOST, "GPU is lost (simulated: fell off the bus)"
            elif ecc > 0 and health is GpuHealth.HEALTHY:
                health, reason = GpuHealth.DEGRADED, f"{ecc} uncorrectable ECC errors"
            lost = health is GpuHealth.LOST and fault.get("lost", False)
            load = used / usable if usable else 0.0
            gpus.append(
                GpuSnapshot(
                    index=gpu.index,
                    uuid=gpu.uuid,
                    name=gpu.name,
                    total_mib=gpu.total_mib,
                    reserved_mib=gpu.reserved_mib,
                    used_mib=0 if lost else used,
                    free_mib=0 if lost else max(0, usable - used),
                    processes=()
                    if lost
                    else tuple(GpuProcess(c.pid, c.used_mib, c.name) for c in mine),
                    utilization_pct=None if lost else int(fault.get("utilization_pct", 0)),
                    temperature_c=None if lost else 35 + round(30 * load),
                    power_w=None if lost else round(15 + 250 * load, 1),
                    ecc_uncorrected=ecc,
                    health=health,
                    health_reason=reason,
                )
            )
        return HostSnapshot(gpus=tuple(gpus), driver_version="simulated", backend=self.name)

    async def wait_events(self, timeout_s: float) -> list[GpuEvent]:
        """Events appended to the host's log; checks the log every few tens of ms."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            events, self._unseen = [*self._unseen, *await self._consume_events()], []
            if events or loop.time() >= deadline:
                return events
            await asyncio.sleep(min(self._poll_interval_s, max(0.0, deadline - loop.time())))

    async def _consume_events(self) -> list[GpuEvent]:
        raw, self._offset = await asyncio.to_thread(self.host.read_events, self._offset)
        events: list[GpuEvent] = []
        for item in raw:
            uuid = str(item["uuid"])
            if item["kind"] == "reset":
                self._xid_health.pop(uuid, None)
                continue
            if item["kind"] != "xid":
                continue
            number = int(item["xid"])
            text = xid_catalogue.describe(number)
            effect = xid_catalogue.health_effect(number)
            if effect is not None:
                self._xid_health[uuid] = effect
            events.append(GpuEvent(uuid=uuid, kind=GpuEventKind.XID, xid=number, detail=text))
        return events

    async def aclose(self) -> None:
        """Nothing to release: the host is plain files."""
