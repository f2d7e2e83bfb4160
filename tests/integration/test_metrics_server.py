"""MetricsServer over real TCP: what a scrape sees, and a clear error when the port is taken."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from daemon_harness import running_fleet
from prometheus_client.parser import text_string_to_metric_families

from fleetd.errors import FleetdError
from fleetd.model.gpu import GpuProcess, GpuSnapshot, HostSnapshot
from fleetd.model.worker import WorkerState, WorkerStatus
from fleetd.obs.metrics import FleetMetrics, MetricsServer, MetricsServerError, follow_events
from fleetd.planning.types import Placement, Plan

pytestmark = pytest.mark.timeout(120)

UUID = "GPU-b850f46d-0000-0000-0000-000000000000"
MIB = 1024 * 1024


@dataclass
class View:
    """A reconciler as the metrics endpoint reads it, holding real fleetd data."""

    host: HostSnapshot | None
    plan: Plan | None
    passes: int = 3
    vram_mib: dict[str, int] = field(default_factory=dict)
    statuses: list[WorkerStatus] = field(default_factory=list)
    pids: dict[int, str] = field(default_factory=dict)

    def workers(self) -> Sequence[WorkerStatus]:
        return self.statuses

    def our_pids(self) -> Mapping[int, str]:
        return self.pids


def status(state: WorkerState) -> WorkerStatus:
    return WorkerStatus(
        name="qwen",
        engine="vllm",
        gpu_uuid=UUID,
        gpu_index=0,
        state=state,
        reason="test",
        port=18100,
        pid=100,
        restarts=0,
        since_s=0.0,
        models=("qwen",),
        budget_mib=16384,
    )


@pytest.fixture
def view() -> View:
    gpu = GpuSnapshot(
        index=0,
        uuid=UUID,
        name="NVIDIA GeForce RTX 4090",
        total_mib=24564,
        reserved_mib=300,
        used_mib=16000,
        free_mib=8264,
        processes=(GpuProcess(100, 16000, "vllm"),),
        temperature_c=61,
    )
    placement = Placement("qwen", 0, UUID, 0, 16384, 50, kept=True)
    return View(
        host=HostSnapshot(gpus=(gpu,)),
        plan=Plan(placements=(placement,), pending=(), stops=(), gpus=()),
        vram_mib={"qwen": 16000},
        statuses=[status(WorkerState.READY)],
        pids={100: "qwen"},
    )


@pytest.fixture
async def server(view: View) -> AsyncIterator[MetricsServer]:
    srv = MetricsServer(FleetMetrics(), view, host="127.0.0.1", port=0)
    await srv.start()
    yield srv
    await srv.stop()


async def scrape(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as resp,
    ):
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


def series(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def one(text: str, metric: str, /, **labels: str) -> float:
    found = [
        v for (n, lbl), v in series(text).items() if n == metric and set(labels.items()) <= lbl
    ]
    assert len(found) == 1, f"{metric}{labels}: {len(found)} samples"
    return found[0]


async def test_scrape_serves_the_text_format(server: MetricsServer) -> None:
    code, content_type, text = await scrape(server.port)
    assert code == 200
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert one(text, "fleetd_gpu_memory_total_bytes", gpu="0", uuid=UUID) == 24564 * MIB
    assert one(text, "fleetd_gpu_memory_ours_bytes", gpu="0") == 16000 * MIB
    assert one(text, "fleetd_gpu_temperature_celsius", gpu="0") == 61
    assert one(text, "fleetd_worker_state", worker="qwen", model="qwen", state="ready") == 1
    assert one(text, "fleetd_model_replicas_ready", model="qwen") == 1
    assert one(text, "fleetd_reconcile_total", result="ok") == 3


async def test_each_scrape_reads_the_reconciler_again(server: MetricsServer, view: View) -> None:
    await scrape(server.port)
    view.statuses = [status(WorkerState.BACKOFF)]
    view.passes = 4
    _, _, text = await scrape(server.port)
    assert one(text, "fleetd_worker_state", worker="qwen", state="backoff") == 1
    assert one(text, "fleetd_model_replicas_ready", model="qwen") == 0
    assert one(text, "fleetd_reconcile_total", result="ok") == 4


@pytest.mark.parametrize("path", ["/", "/metrics/", "/v1/status", "/favicon.ico"])
async def test_only_metrics_is_served(server: MetricsServer, path: str) -> None:
    code, _, _ = await scrape(server.port, path)
    assert code == 404


async def test_a_taken_port_is_a_clear_error(server: MetricsServer, view: View) -> None:
    second = MetricsServer(FleetMetrics(), view, host="127.0.0.1", port=server.port)
    with pytest.raises(MetricsServerError) as info:
        await second.start()
    assert isinstance(info.value, FleetdError)
    message = str(info.value)
    assert f"port {server.port}" in message
    assert "[metrics] port" in message
    await second.stop()  # nothing started: a no-op
    code, _, _ = await scrape(server.port)
    assert code == 200  # the first server is unharmed


async def test_stop_releases_the_port(view: View) -> None:
    first = MetricsServer(FleetMetrics(), view, host="127.0.0.1", port=0)
    await first.start()
    port = first.port
    await first.stop()
    await first.stop()  # idempotent
    again = MetricsServer(FleetMetrics(), view, host="127.0.0.1", port=port)
    await again.start()
    try:
        code, _, _ = await scrape(port)
        assert code == 200
    finally:
        await again.stop()


ONE_VLLM = """
[[models]]
name = "tiny"
engine = "vllm"
model = "tiny-model"
vram_gib = 4.0
overhead_gib = 0.0
[models.health]
HEALTH
"""


async def test_a_real_daemon_kill_9_shows_as_a_restart(tmp_path: Path) -> None:
    """The real Reconciler is a ReconcilerView; a SIGKILLed worker counts one `exit` restart."""
    async with running_fleet(tmp_path / "fleet", ONE_VLLM) as fleet:
        metrics = FleetMetrics(clock=asyncio.get_running_loop().time)
        follower = asyncio.create_task(follow_events(fleet.daemon.bus, metrics))
        server = MetricsServer(metrics, fleet.reconciler, host="127.0.0.1", port=0)
        await server.start()
        try:
            ready = await fleet.wait_state("tiny", WorkerState.READY)
            assert ready.pid is not None
            os.kill(ready.pid, signal.SIGKILL)
            await fleet.wait_until("a restart", lambda: fleet.status("tiny").restarts >= 1)
            await fleet.wait_state("tiny", WorkerState.READY)
            await fleet.reconciler.wait_passes(1)  # a pass measures the new process's VRAM
            _, _, text = await scrape(server.port)
        finally:
            await server.stop()
            follower.cancel()
            with pytest.raises(asyncio.CancelledError):
                await follower
    labels = {"worker": "tiny", "engine": "vllm", "gpu": "0", "model": "tiny"}
    assert one(text, "fleetd_worker_restarts_total", reason="exit", **labels) == 1
    assert one(text, "fleetd_worker_state", state="ready", **labels) == 1
    assert one(text, "fleetd_worker_vram_bytes", **labels) == 4096 * MIB
    assert one(text, "fleetd_model_replicas_ready", model="tiny") == 1
    assert 0 < one(text, "fleetd_model_availability_ratio", model="tiny") < 1
    assert one(text, "fleetd_reconcile_total", result="ok") >= 1
