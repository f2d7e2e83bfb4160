"""NvmlBackend against the real NVML: runs on GPU hosts, skips (saying why) everywhere else."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from fleetd.model.gpu import GpuHealth
from fleetd.runtime import nvml

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def real_nvml() -> None:
    """Skip unless NVML starts and sees at least one GPU."""
    pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py (module pynvml) is not installed")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        pytest.skip(f"NVML is not usable on this host (no NVIDIA driver or GPU?): {err}")
    try:
        count = pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()
    if count == 0:
        pytest.skip("NVML started but reports no GPU")


@pytest.fixture
async def backend(real_nvml: None) -> AsyncIterator[nvml.NvmlBackend]:
    opened = await nvml.NvmlBackend.open()
    yield opened
    await opened.aclose()


async def test_snapshot_reads_every_real_gpu(backend: nvml.NvmlBackend) -> None:
    host = await backend.snapshot()
    assert (host.backend, bool(host.driver_version)) == ("nvml", True)
    assert len(host.gpus) >= 1
    for gpu in host.gpus:
        assert gpu.uuid.startswith("GPU-"), gpu.uuid
        assert gpu.total_mib > 0
        if gpu.health is GpuHealth.LOST:
            continue  # nothing was read; its identity comes from the cache
        accounted = gpu.free_mib + gpu.used_mib + gpu.reserved_mib
        assert abs(gpu.total_mib - accounted) <= max(64, gpu.total_mib // 100), gpu


async def test_wait_events_returns_a_list(backend: nvml.NvmlBackend) -> None:
    assert isinstance(await backend.wait_events(0.2), list)


async def test_aclose_twice_is_harmless(real_nvml: None) -> None:
    backend = await nvml.NvmlBackend.open()
    await backend.aclose()
    await backend.aclose()
