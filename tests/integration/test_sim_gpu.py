"""The simulated GPU host behaves like a driver: per-process memory, freed when processes die."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleetd.model.gpu import GpuEventKind, GpuHealth
from fleetd.sim.gpu import SimulatedGpuBackend
from fleetd.sim.host import ENV_SIM_DIR, SimHost, SimHostError

Hog = Callable[[str, int], "subprocess.Popen[str]"]


@pytest.fixture
def sim(tmp_path: Path) -> SimHost:
    return SimHost.create(tmp_path / "sim", [("RTX A", 16384, 0), ("RTX B", 16384, 256)])


@pytest.fixture
def spawn_hog(sim: SimHost) -> Iterator[Hog]:
    procs: list[subprocess.Popen[str]] = []

    def start(gpu: str, mib: int) -> subprocess.Popen[str]:
        env = {**os.environ, ENV_SIM_DIR: str(sim.root)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleetd.sim.hog", "--gpu", gpu, "--mib", str(mib)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the claim is written, no sleeping
        assert line == "ready\n", proc.stderr.read() if proc.stderr else ""
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.communicate()  # reaps it and closes its pipes


async def test_memory_of_a_live_process_counts_and_is_freed_when_it_dies(
    sim: SimHost, spawn_hog: Hog
) -> None:
    backend = SimulatedGpuBackend(sim)
    hog = spawn_hog("1", 4096)
    snap = await backend.snapshot()
    gpu1 = snap.gpus[1]
    assert (gpu1.used_mib, gpu1.free_mib, gpu1.reserved_mib) == (4096, 16384 - 256 - 4096, 256)
    assert [(p.pid, p.used_mib) for p in gpu1.processes] == [(hog.pid, 4096)]
    assert snap.gpus[0].used_mib == 0
    hog.kill()
    hog.wait()  # reaped: the "driver" must now see the pid gone
    after = await backend.snapshot()
    assert after.gpus[1].used_mib == 0
    assert after.gpus[1].processes == ()


async def test_claim_beyond_free_memory_fails_like_cuda_oom(sim: SimHost, spawn_hog: Hog) -> None:
    spawn_hog("0", 12000)
    with pytest.raises(
        SimHostError, match="CUDA out of memory on gpu0: tried to allocate 5000 MiB, 4384 MiB free"
    ):
        sim.claim("0", 5000)


async def test_faults_map_to_health(sim: SimHost) -> None:
    backend = SimulatedGpuBackend(sim)
    gpu0, gpu1 = (g.uuid for g in sim.gpus())
    sim.set_fault(gpu0, lost=True)
    sim.set_fault(gpu1, ecc_uncorrected=2)
    snap = await backend.snapshot()
    assert snap.gpus[0].health is GpuHealth.LOST
    assert snap.gpus[1].health is GpuHealth.DEGRADED
    assert snap.gpus[1].health_reason == "2 uncorrectable ECC errors"
    with pytest.raises(SimHostError, match="gpu0 is lost"):
        sim.claim(gpu0, 10)
    sim.clear_faults(gpu0)
    sim.clear_faults(gpu1)
    healed = await backend.snapshot()
    assert [g.health for g in healed.gpus] == [GpuHealth.HEALTHY, GpuHealth.HEALTHY]


@pytest.mark.parametrize(
    ("xid", "health"),
    [
        (13, GpuHealth.HEALTHY),
        (63, GpuHealth.HEALTHY),
        (48, GpuHealth.LOST),
        (79, GpuHealth.LOST),
    ],
)
async def test_xid_events_are_delivered_and_sticky_until_reset(
    sim: SimHost, xid: int, health: GpuHealth
) -> None:
    backend = SimulatedGpuBackend(sim)
    uuid = sim.gpus()[1].uuid
    assert await backend.wait_events(0.01) == []
    sim.inject_xid("1", xid)
    [event] = await backend.wait_events(2.0)
    assert (event.uuid, event.kind, event.xid) == (uuid, GpuEventKind.XID, xid)
    assert event.detail.startswith(f"XID {xid}")
    assert (await backend.snapshot()).gpus[1].health is health
    assert (await backend.snapshot()).gpus[1].health is health  # sticky
    sim.clear_faults("1")
    assert (await backend.snapshot()).gpus[1].health is GpuHealth.HEALTHY


async def test_persistent_foreign_claim_survives_without_a_process(sim: SimHost) -> None:
    sim.claim("0", 300, pid=4242, name="foreign", persistent=True)
    snap = await SimulatedGpuBackend(sim).snapshot()
    assert [(p.pid, p.used_mib, p.name) for p in snap.gpus[0].processes] == [(4242, 300, "foreign")]


def test_from_env_names_the_missing_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_SIM_DIR, raising=False)
    with pytest.raises(SimHostError, match=r"\$FLEETD_SIM_DIR is not set"):
        SimHost.from_env()
