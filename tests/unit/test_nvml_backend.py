"""NvmlBackend against the fake pynvml: shapes, units, health mapping, events, threading."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import AsyncIterator, Callable

import fake_pynvml
import pytest
from fake_pynvml import GIB, MIB, FakeDevice, FakePynvml

from fleetd.errors import GpuBackendError
from fleetd.model.gpu import GpuEvent, GpuEventKind, GpuHealth, GpuProcess
from fleetd.runtime import nvml
from fleetd.runtime.gpu import GpuBackend

UUID0 = "GPU-b850f46d-d5ea-c752-ddf3-c4453e44d3f7"
UUID1 = "GPU-0d1e2f3a-4b5c-6d7e-8f90-a1b2c3d4e5f6"
LOST_ERRORS = ["GpuIsLost", "GpuNotFound", "Unknown", "ResetRequired"]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakePynvml:
    module = FakePynvml(
        [
            FakeDevice(UUID0, used_bytes=10 * GIB + MIB // 2, compute_processes=[(4242, 10 * GIB)]),
            FakeDevice(UUID1, name="NVIDIA GeForce RTX 4090", total_bytes=24 * GIB),
        ]
    )
    monkeypatch.setitem(sys.modules, "pynvml", module)
    return module


@pytest.fixture
async def backend(fake: FakePynvml) -> AsyncIterator[nvml.NvmlBackend]:
    opened = await nvml.NvmlBackend.open()
    yield opened
    await opened.aclose()


async def gpu_health(backend: nvml.NvmlBackend) -> dict[str, GpuHealth]:
    return {g.uuid: g.health for g in (await backend.snapshot()).gpus}


# --- snapshots ---


async def test_snapshot_reports_every_gpu_in_mib_with_v2_memory(backend: nvml.NvmlBackend) -> None:
    host = await backend.snapshot()
    assert (host.backend, host.driver_version, host.errors) == ("nvml", "570.124.06", ())
    gpu0, gpu1 = host.gpus
    assert (gpu0.index, gpu0.uuid, gpu0.name) == (0, UUID0, "NVIDIA H100 80GB HBM3")
    # v2: used excludes the 512 MiB reservation; half a MiB rounds down
    assert (gpu0.total_mib, gpu0.reserved_mib, gpu0.used_mib) == (81920, 512, 10240)
    assert gpu0.free_mib == 81920 - 512 - 10240 - 1
    assert gpu0.processes == (GpuProcess(pid=4242, used_mib=10240),)
    assert (gpu0.utilization_pct, gpu0.temperature_c, gpu0.power_w) == (0, 35, 70.0)
    assert (gpu0.ecc_uncorrected, gpu0.health, gpu0.health_reason) == (0, GpuHealth.HEALTHY, "")
    assert (gpu1.index, gpu1.uuid, gpu1.total_mib, gpu1.used_mib) == (1, UUID1, 24576, 0)


def drop_v2_function(fake: FakePynvml, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.fail("nvmlDeviceGetMemoryInfo_v2", "FunctionNotFound")


def drop_v2_constant(fake: FakePynvml, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(fake, "nvmlMemory_v2")


@pytest.mark.parametrize("old_driver", [drop_v2_function, drop_v2_constant])
async def test_memory_falls_back_to_v1_where_v2_is_missing(
    fake: FakePynvml,
    monkeypatch: pytest.MonkeyPatch,
    old_driver: Callable[[FakePynvml, pytest.MonkeyPatch], None],
) -> None:
    old_driver(fake, monkeypatch)
    backend = await nvml.NvmlBackend.open()
    gpu0 = (await backend.snapshot()).gpus[0]
    await backend.aclose()
    # v1 counts the reservation as used; there is no separate figure
    assert (gpu0.reserved_mib, gpu0.used_mib, gpu0.health) == (0, 512 + 10240, GpuHealth.HEALTHY)
    assert gpu0.free_mib == 81920 - 512 - 10240 - 1


async def test_processes_merge_compute_and_graphics_and_keep_unknown_memory(
    fake: FakePynvml, backend: nvml.NvmlBackend
) -> None:
    fake.devices[1].compute_processes = [(100, 2 * GIB), (101, None)]
    fake.devices[1].graphics_processes = [(101, GIB), (102, 3 * MIB)]
    gpu1 = (await backend.snapshot()).gpus[1]
    assert gpu1.processes == (
        GpuProcess(pid=100, used_mib=2048),
        GpuProcess(pid=101, used_mib=None),
        GpuProcess(pid=102, used_mib=3),
    )


async def test_missing_sensors_read_as_none_and_leave_the_gpu_healthy(
    fake: FakePynvml, backend: nvml.NvmlBackend
) -> None:
    dev = fake.devices[0]
    dev.utilization_pct = dev.temperature_c = dev.power_mw = dev.ecc_uncorrected = None
    fake.fail("nvmlDeviceGetGraphicsRunningProcesses", "NotSupported")
    gpu0 = (await backend.snapshot()).gpus[0]
    assert (gpu0.utilization_pct, gpu0.temperature_c, gpu0.power_w, gpu0.ecc_uncorrected) == (
        None,
        None,
        None,
        None,
    )
    assert gpu0.health is GpuHealth.HEALTHY


async def test_sensor_without_data_yet_reads_as_none(
    fake: FakePynvml, backend: nvml.NvmlBackend
) -> None:
    fake.fail("nvmlDeviceGetPowerUsage", "NoData", device=0)
    gpu0 = (await backend.snapshot()).gpus[0]
    assert (gpu0.power_w, gpu0.health) == (None, GpuHealth.HEALTHY)


@pytest.mark.parametrize("error", LOST_ERRORS)
@pytest.mark.parametrize(
    "call", ["nvmlDeviceGetMemoryInfo", "nvmlDeviceGetUUID", "nvmlDeviceGetTemperature"]
)
async def test_unreachable_gpu_is_lost_but_still_listed(
    fake: FakePynvml, backend: nvml.NvmlBackend, call: str, error: str
) -> None:
    fake.fail(call, error, device=1)
    host = await backend.snapshot()
    gpu0, gpu1 = host.gpus
    assert gpu0.health is GpuHealth.HEALTHY
    assert (gpu1.index, gpu1.uuid, gpu1.name, gpu1.total_mib) == (
        1,
        UUID1,
        "NVIDIA GeForce RTX 4090",
        24576,
    )
    assert (gpu1.health, gpu1.used_mib, gpu1.free_mib, gpu1.processes) == (
        GpuHealth.LOST,
        0,
        0,
        (),
    )
    assert str(fake_pynvml.error(error)) in gpu1.health_reason
    assert any(e.startswith("gpu1:") for e in host.errors)


async def test_queries_stop_once_a_gpu_is_lost(fake: FakePynvml, backend: nvml.NvmlBackend) -> None:
    fake.fail("nvmlDeviceGetMemoryInfo", "GpuIsLost", device=1)
    fake.calls.clear()
    await backend.snapshot()
    assert fake.call_names().count("nvmlDeviceGetMemoryInfo") == 2
    assert fake.call_names().count("nvmlDeviceGetTemperature") == 1  # gpu0's only


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        ("nvmlDeviceGetTemperature", "Timeout", "nvmlDeviceGetTemperature timed out"),
        ("nvmlDeviceGetComputeRunningProcesses", "Timeout", "timed out"),
        ("nvmlDeviceGetMemoryInfo", "Timeout", "nvmlDeviceGetMemoryInfo timed out"),
        ("nvmlDeviceGetPowerUsage", "InsufficientResources", "nvmlDeviceGetPowerUsage failed"),
    ],
)
async def test_failing_query_degrades_the_gpu_and_names_the_call(
    fake: FakePynvml, backend: nvml.NvmlBackend, call: str, error: str, words: str
) -> None:
    fake.fail(call, error, device=0)
    gpu0, gpu1 = (await backend.snapshot()).gpus
    assert (gpu0.health, gpu1.health) == (GpuHealth.DEGRADED, GpuHealth.HEALTHY)
    assert words in gpu0.health_reason


async def test_uncorrectable_ecc_errors_degrade_the_gpu(
    fake: FakePynvml, backend: nvml.NvmlBackend
) -> None:
    fake.devices[0].ecc_uncorrected = 3
    gpu0 = (await backend.snapshot()).gpus[0]
    assert (gpu0.ecc_uncorrected, gpu0.health) == (3, GpuHealth.DEGRADED)
    assert gpu0.health_reason == "3 uncorrectable ECC errors"


async def test_gpu_the_driver_no_longer_enumerates_is_lost(
    fake: FakePynvml, backend: nvml.NvmlBackend
) -> None:
    del fake.devices[1]
    host = await backend.snapshot()
    assert [(g.index, g.uuid, g.health) for g in host.gpus] == [
        (0, UUID0, GpuHealth.HEALTHY),
        (1, UUID1, GpuHealth.LOST),
    ]
    assert "no longer enumerated by the driver" in host.gpus[1].health_reason


async def test_query_failures_are_not_sticky(fake: FakePynvml, backend: nvml.NvmlBackend) -> None:
    fake.lose(0)
    assert (await gpu_health(backend))[UUID0] is GpuHealth.LOST
    fake.heal("*", device=0)
    assert (await gpu_health(backend))[UUID0] is GpuHealth.HEALTHY


async def test_failing_enumeration_reports_known_gpus_with_the_reason(
    fake: FakePynvml, backend: nvml.NvmlBackend
) -> None:
    fake.fail("nvmlDeviceGetCount", "Unknown")
    host = await backend.snapshot()
    assert [g.health for g in host.gpus] == [GpuHealth.LOST, GpuHealth.LOST]
    assert any("nvmlDeviceGetCount" in e for e in host.errors)


# --- start-up ---


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        ("nvmlInit", "LibraryNotFound", ["libnvidia-ml.so.1", "--simulate", "fleetd demo"]),
        ("nvmlInit", "DriverNotLoaded", ["kernel driver is not loaded", "nvidia-smi", "lsmod"]),
        ("nvmlInit", "NoPermission", ["/dev/nvidiactl", "video", "render"]),
        ("nvmlDeviceGetCount", "NoPermission", ["/dev/nvidiactl", "video", "render"]),
        ("nvmlInit", "LibRmVersionMismatch", ["reboot"]),
        ("nvmlInit", "OperatingSystem", ["The operating system has blocked", "nvidia-smi"]),
    ],
)
async def test_start_failure_says_what_to_do(
    fake: FakePynvml, call: str, error: str, words: list[str]
) -> None:
    fake.fail(call, error)
    with pytest.raises(GpuBackendError) as caught:
        await nvml.NvmlBackend.open()
    message = str(caught.value)
    assert all(w in message for w in words), message
    assert "Traceback" not in message
    assert "NVMLError" not in message
    assert caught.value.__suppress_context__
    assert fake.init_count == 0  # a successful nvmlInit was balanced by nvmlShutdown


async def test_missing_pynvml_says_which_package_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    with pytest.raises(GpuBackendError, match="nvidia-ml-py"):
        nvml.NvmlBackend()


async def test_module_can_be_passed_explicitly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    module = FakePynvml([FakeDevice(UUID0)])
    backend = await nvml.NvmlBackend.open(module)
    assert [g.uuid for g in (await backend.snapshot()).gpus] == [UUID0]
    await backend.aclose()


async def test_backend_satisfies_the_protocol(backend: nvml.NvmlBackend) -> None:
    as_protocol: GpuBackend = backend
    assert as_protocol.name == "nvml"


async def test_unstarted_backend_refuses_to_read(fake: FakePynvml) -> None:
    with pytest.raises(GpuBackendError, match="not started"):
        await nvml.NvmlBackend().snapshot()


# --- events ---


async def test_no_event_within_the_timeout_gives_an_empty_list(backend: nvml.NvmlBackend) -> None:
    assert await backend.wait_events(0.05) == []
    assert await backend.wait_events(0) == []


@pytest.mark.parametrize(
    ("xid", "health", "words"),
    [
        (13, GpuHealth.HEALTHY, "graphics engine exception"),
        (63, GpuHealth.HEALTHY, "informational"),
        (48, GpuHealth.LOST, "must be reset"),
        (95, GpuHealth.LOST, "must be reset"),
        (79, GpuHealth.LOST, "fallen off the bus"),
    ],
)
async def test_xid_event_is_returned_and_sets_the_gpus_health(
    fake: FakePynvml, backend: nvml.NvmlBackend, xid: int, health: GpuHealth, words: str
) -> None:
    fake.push_event(1, fake_pynvml.EVENT_XID, xid)
    (event,) = await backend.wait_events(1.0)
    assert (event.uuid, event.kind, event.xid) == (UUID1, GpuEventKind.XID, xid)
    assert words in event.detail
    gpu0, gpu1 = (await backend.snapshot()).gpus
    assert (gpu0.health, gpu1.health) == (GpuHealth.HEALTHY, health)
    if health is not GpuHealth.HEALTHY:
        assert gpu1.health_reason == event.detail
    # sticky until the backend is reopened, even though every query still succeeds
    assert (await gpu_health(backend))[UUID1] is health


async def test_milder_xid_does_not_undo_a_worse_one(
    fake: FakePynvml, backend: nvml.NvmlBackend
) -> None:
    fake.push_event(0, fake_pynvml.EVENT_XID, 79)
    fake.push_event(0, fake_pynvml.EVENT_XID, 48)
    assert [e.xid for e in await backend.wait_events(1.0)] == [79, 48]
    assert (await gpu_health(backend))[UUID0] is GpuHealth.LOST


async def test_events_are_drained_in_one_call(fake: FakePynvml, backend: nvml.NvmlBackend) -> None:
    fake.push_event(0, fake_pynvml.EVENT_XID, 13)
    fake.push_event(1, fake_pynvml.EVENT_SBE)
    fake.push_event(0, fake_pynvml.EVENT_DBE)
    events = await backend.wait_events(1.0)
    assert [(e.uuid, e.kind) for e in events] == [
        (UUID0, GpuEventKind.XID),
        (UUID1, GpuEventKind.ECC_SINGLE_BIT),
        (UUID0, GpuEventKind.ECC_DOUBLE_BIT),
    ]
    assert await backend.wait_events(0) == []


async def test_gpu_unavailable_event_makes_the_gpu_lost(
    fake: FakePynvml, backend: nvml.NvmlBackend
) -> None:
    fake.push_event(0, fake_pynvml.EVENT_UNAVAILABLE)
    assert await backend.wait_events(1.0) == [
        GpuEvent(UUID0, GpuEventKind.LOST, detail="the driver reports the GPU as unavailable")
    ]
    assert (await gpu_health(backend))[UUID0] is GpuHealth.LOST


async def test_lost_gpu_during_wait_is_found_by_a_fresh_snapshot(
    fake: FakePynvml, backend: nvml.NvmlBackend
) -> None:
    fake.lose(1)
    fake.push_wait_error("GpuIsLost")
    (event,) = await backend.wait_events(1.0)
    assert (event.uuid, event.kind) == (UUID1, GpuEventKind.LOST)
    assert "GPU is lost" in event.detail
    fake.push_wait_error("GpuIsLost")  # still failing: no second LOST event for the same GPU
    assert await backend.wait_events(0.05) == []


async def test_event_from_a_gpu_that_cannot_be_named_still_reports_the_loss(
    fake: FakePynvml, backend: nvml.NvmlBackend
) -> None:
    fake.push_event(1, fake_pynvml.EVENT_XID, 79)
    fake.lose(1)  # nvmlDeviceGetUUID(data.device) now raises GpuIsLost
    events = await backend.wait_events(1.0)
    assert [(e.uuid, e.kind, e.xid) for e in events] == [
        ("", GpuEventKind.XID, 79),
        (UUID1, GpuEventKind.LOST, None),
    ]


async def test_only_supported_event_types_are_registered(fake: FakePynvml) -> None:
    fake.devices[0].supported_events = fake_pynvml.EVENT_XID | 0x4  # XID and PState
    fake.devices[1].supported_events = 0
    backend = await nvml.NvmlBackend.open()
    (event_set,) = fake.event_sets
    assert [(d.uuid, m) for d, m in event_set.registrations] == [(UUID0, fake_pynvml.EVENT_XID)]
    assert (await backend.snapshot()).errors == ()
    await backend.aclose()


@pytest.mark.parametrize(
    ("call", "error", "host_error"),
    [
        ("nvmlDeviceRegisterEvents", "NotSupported", None),
        ("nvmlDeviceGetSupportedEventTypes", "NotSupported", None),
        ("nvmlEventSetCreate", "NotSupported", "GPU events unavailable"),
        ("nvmlDeviceRegisterEvents", "NoPermission", "gpu0: event type 0x8"),
    ],
)
async def test_hosts_without_events_still_work(
    fake: FakePynvml, call: str, error: str, host_error: str | None
) -> None:
    fake.fail(call, error)
    backend = await nvml.NvmlBackend.open()
    host = await backend.snapshot()
    assert [g.health for g in host.gpus] == [GpuHealth.HEALTHY, GpuHealth.HEALTHY]
    assert any(host_error in e for e in host.errors) if host_error else host.errors == ()
    assert await backend.wait_events(0.01) == []
    await backend.aclose()
    assert all(s.freed for s in fake.event_sets)


# --- shutdown and threading ---


async def test_aclose_is_idempotent_and_frees_everything_once(fake: FakePynvml) -> None:
    backend = await nvml.NvmlBackend.open()
    await backend.aclose()
    await backend.aclose()
    assert (fake.shutdown_calls, fake.init_count) == (1, 0)
    assert [s.freed for s in fake.event_sets] == [True]
    with pytest.raises(GpuBackendError, match="closed"):
        await backend.snapshot()
    with pytest.raises(GpuBackendError, match="closed"):
        await backend.wait_events(0)


async def test_aclose_stops_a_long_wait_promptly(
    fake: FakePynvml, backend: nvml.NvmlBackend
) -> None:
    waiter = asyncio.create_task(backend.wait_events(60))
    assert await asyncio.to_thread(fake.waiting.wait, 5)
    async with asyncio.timeout(5):
        await backend.aclose()
        assert await waiter == []
    assert 0 < max(fake.wait_timeouts_ms) <= 1000  # waits in slices, checking for stop between


async def test_pynvml_is_never_called_on_the_event_loop_thread(fake: FakePynvml) -> None:
    loop_thread = threading.get_ident()
    backend = await nvml.NvmlBackend.open()
    fake.lose(1)
    fake.push_event(0, fake_pynvml.EVENT_XID, 13)
    fake.push_wait_error("GpuIsLost")
    await backend.snapshot()
    await backend.wait_events(0.5)
    await backend.wait_events(0.05)
    await backend.aclose()
    names = set(fake.call_names())
    assert {"nvmlInit", "nvmlEventSetWait_v2", "nvmlDeviceGetMemoryInfo", "nvmlShutdown"} <= names
    assert loop_thread not in fake.call_threads()


def test_fake_handles_and_errors_behave_like_pynvml(fake: FakePynvml) -> None:
    fake.nvmlInit()
    first, second = fake.nvmlDeviceGetHandleByIndex(0), fake.nvmlDeviceGetHandleByIndex(0)
    assert first != second
    with pytest.raises(TypeError):
        hash(first)
    lost = fake.NVMLError(15)
    assert isinstance(lost, fake.NVMLError_GpuIsLost)
    assert (str(lost), lost.value) == ("GPU is lost", 15)
    assert str(fake.NVMLError_Timeout()) == "Timeout"
    with pytest.raises(TypeError):
        hash(lost)
