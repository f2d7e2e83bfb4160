"""GpuBackend over NVML (nvidia-ml-py's ``pynvml``): real GPUs, their memory, health and XIDs.

The planner needs exact free memory per GPU and must learn when a GPU breaks. Every pynvml
call is a blocking C call (one against a hung GPU can take seconds), so this module must never
call pynvml on the event loop thread: all of it runs in worker threads (``asyncio.to_thread``).
It must not key anything by an NVML handle (handles are neither hashable nor comparable): GPUs
are keyed by UUID. It must not raise for a broken GPU; that is reported as health. Only a
backend that cannot start at all raises ``GpuBackendError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import threading
import time
from typing import Any, TypeAlias

from fleetd.errors import GpuBackendError
from fleetd.model import units
from fleetd.model.gpu import (
    GpuEvent,
    GpuEventKind,
    GpuHealth,
    GpuProcess,
    GpuSnapshot,
    HostSnapshot,
)
from fleetd.runtime import nvml_errors

_SLICE_MS = 1000  # longest single nvmlEventSetWait, so aclose() stops a waiter within ~1 s
_MAX_DRAIN = 256  # events taken after the first in one call, so a storm cannot pin the thread
_CLOSE_WAIT_S = 5.0  # aclose() waits this long for an in-flight NVML job before shutting down
_RawEvent: TypeAlias = tuple[str | None, int, int]  # uuid (None: unknown), eventType, eventData


def _import_pynvml() -> Any:  # noqa: ANN401 - pynvml is untyped; this is its one typed door
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        raise GpuBackendError(nvml_errors.IMPORT_FAILURE) from None


def _error_name(err: BaseException) -> str:
    return type(err).__name__


def _init_failure(err: BaseException) -> GpuBackendError:
    return GpuBackendError(nvml_errors.init_failure_message(_error_name(err), str(err)))


@dataclasses.dataclass(frozen=True, slots=True)
class _Identity:
    """What is remembered about a GPU, so it can still be shown once NVML cannot read it."""

    index: int
    uuid: str
    name: str
    total_mib: int


class _Probe:
    """One GPU's queries in one snapshot: a failed query becomes health, not an exception."""

    def __init__(self, nvml: Any, label: str, errors: list[str]) -> None:  # noqa: ANN401
        self.nvml = nvml
        self.label = label
        self.errors = errors
        self.health = GpuHealth.HEALTHY
        self.reason = ""

    @property
    def lost(self) -> bool:
        return self.health is GpuHealth.LOST

    def note(self, health: GpuHealth, reason: str) -> None:
        if nvml_errors.is_worse(health, self.health):
            self.health, self.reason = health, reason

    def fail(self, call: str, err: BaseException) -> None:
        self.note(*nvml_errors.query_failure(_error_name(err), str(err), call=call))
        self.errors.append(f"{self.label}: {call}: {err}")

    def read(self, call: str, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        """``pynvml.<call>(*args)``, or None if absent (NotSupported/NoData) or failed."""
        if self.lost:  # every further query against a lost GPU would be slow and fail too
            return None
        try:
            return getattr(self.nvml, call)(*args, **kwargs)
        except self.nvml.NVMLError as err:
            if _error_name(err) not in nvml_errors.ABSENT_ERRORS:
                self.fail(call, err)
            return None
        except getattr(self.nvml, "NVMLLibraryMismatchError", self.nvml.NVMLError) as err:
            self.errors.append(f"{self.label}: {call}: {err}")  # old driver; the GPU is fine
            return None


class NvmlBackend:
    """Observes the host's NVIDIA GPUs through NVML; create it with ``await NvmlBackend.open()``."""

    name = "nvml"

    def __init__(self, nvml: Any = None) -> None:  # noqa: ANN401 - the pynvml module (or a fake)
        self._nvml: Any = _import_pynvml() if nvml is None else nvml
        self._started = False
        self._closed = False
        self._known: dict[str, _Identity] = {}  # by UUID; written only under _query_lock
        self._memory_v1 = False  # the driver lacks nvmlDeviceGetMemoryInfo_v2
        self._open_errors: list[str] = []
        self._event_set: Any = None
        self._event_kinds: dict[int, GpuEventKind] = {}
        self._wait_failed = False
        self._sticky: dict[str, tuple[GpuHealth, str]] = {}  # from events; loop thread only
        self._reported_lost: set[str] = set()
        self._query_lock = threading.Lock()  # one snapshot job at a time; shutdown waits for it
        self._event_lock = threading.Lock()  # guards the event set against a concurrent free
        self._stop = threading.Event()  # ends an in-flight wait between slices

    @classmethod
    async def open(cls, nvml: Any = None) -> NvmlBackend:  # noqa: ANN401
        """Start NVML (in a worker thread); ``GpuBackendError`` says what to do if it cannot."""
        backend = cls(nvml)
        await backend.start()
        return backend

    async def start(self) -> None:
        """Initialise NVML, learn the GPUs and register for their events (in a worker thread)."""
        if not self._started:
            await asyncio.to_thread(self._start_sync)
            self._started = True

    async def snapshot(self) -> HostSnapshot:
        """Every GPU now; GPUs NVML cannot read appear with their health and reason."""
        self._check_open()
        gpus, driver, errors = await asyncio.to_thread(self._read_host)
        gpus = sorted((self._with_sticky_health(g) for g in gpus), key=lambda g: g.index)
        return HostSnapshot(
            gpus=tuple(gpus), driver_version=driver, backend=self.name, errors=tuple(errors)
        )

    async def wait_events(self, timeout_s: float) -> list[GpuEvent]:
        """Events from the driver, waiting up to ``timeout_s`` for the first; [] if none came."""
        self._check_open()
        raw, failure = await asyncio.to_thread(self._wait_sync, max(0.0, timeout_s))
        events = [e for e in map(self._to_event, raw) if e is not None]
        if (failure is not None or any(uuid is None for uuid, _, _ in raw)) and not self._closed:
            # the wait itself failed (e.g. GpuIsLost) or an event's GPU could not be named:
            # only a fresh snapshot tells which GPUs are gone
            for gpu in (await self.snapshot()).gpus:
                if gpu.health is GpuHealth.LOST and gpu.uuid not in self._reported_lost:
                    self._reported_lost.add(gpu.uuid)
                    events.append(GpuEvent(gpu.uuid, GpuEventKind.LOST, detail=gpu.health_reason))
        return events

    async def aclose(self) -> None:
        """Stop any wait, free the event set and shut NVML down (in a worker thread)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._started:
            await asyncio.to_thread(self._close_sync)

    def _check_open(self) -> None:
        if self._closed:
            raise GpuBackendError("the NVML backend is closed")
        if not self._started:
            raise GpuBackendError("the NVML backend is not started: use `await NvmlBackend.open()`")

    # --- worker-thread jobs: the only code that calls pynvml ---

    def _start_sync(self) -> None:
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as err:
            raise _init_failure(err) from None
        try:
            count = int(nvml.nvmlDeviceGetCount())  # NoPermission can surface only here
        except nvml.NVMLError as err:
            with contextlib.suppress(nvml.NVMLError):
                nvml.nvmlShutdown()
            raise _init_failure(err) from None
        self._read_host()  # learn every GPU's identity now (and pay NVML's per-GPU init cost)
        self._event_set = self._create_event_set(count)

    def _create_event_set(self, count: int) -> Any:  # noqa: ANN401
        nvml = self._nvml
        bits = {int(getattr(nvml, a, 0)): kind for a, kind in nvml_errors.EVENT_TYPES.items()}
        self._event_kinds = {bit: kind for bit, kind in bits.items() if bit}
        try:
            event_set = nvml.nvmlEventSetCreate()
        except nvml.NVMLError as err:
            self._open_errors.append(f"GPU events unavailable: nvmlEventSetCreate: {err}")
            return None
        registered = 0
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                supported = int(nvml.nvmlDeviceGetSupportedEventTypes(handle))
            except nvml.NVMLError:
                continue  # no events from this GPU; its health still comes from snapshots
            for bit in (b for b in self._event_kinds if b & supported):
                try:  # bit by bit, so one type the driver refuses does not cost the others
                    nvml.nvmlDeviceRegisterEvents(handle, bit, event_set)
                    registered += 1
                except nvml.NVMLError as err:
                    if _error_name(err) not in nvml_errors.ABSENT_ERRORS:
                        self._open_errors.append(f"gpu{index}: event type {bit:#x}: {err}")
        if registered:
            return event_set
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlEventSetFree(event_set)
        return None

    def _read_host(self) -> tuple[list[GpuSnapshot], str, list[str]]:
        nvml = self._nvml
        errors = list(self._open_errors)
        with self._query_lock:
            try:
                driver = str(nvml.nvmlSystemGetDriverVersion())
            except nvml.NVMLError as err:
                driver = ""
                errors.append(f"nvmlSystemGetDriverVersion: {err}")
            try:
                count = int(nvml.nvmlDeviceGetCount())
            except nvml.NVMLError as err:
                errors.append(f"nvmlDeviceGetCount: {err}")
                health, reason = nvml_errors.query_failure(
                    _error_name(err), str(err), call="nvmlDeviceGetCount"
                )
                return [_unread(k, health, reason) for k in self._known.values()], driver, errors
            gpus = [gpu for i in range(count) if (gpu := self._read_gpu(i, errors)) is not None]
            seen = {gpu.uuid for gpu in gpus}
            gone = "no longer enumerated by the driver: check `nvidia-smi` and `dmesg`"
            gpus += [
                _unread(k, GpuHealth.LOST, gone) for k in self._known.values() if k.uuid not in seen
            ]
            return gpus, driver, errors

    def _read_gpu(self, index: int, errors: list[str]) -> GpuSnapshot | None:
        nvml = self._nvml
        probe = _Probe(nvml, f"gpu{index}", errors)
        handle = probe.read("nvmlDeviceGetHandleByIndex", index)
        uuid = None if handle is None else probe.read("nvmlDeviceGetUUID", handle)
        if uuid is None:  # cannot tell which GPU this is: fall back to what index held before
            cached = next((k for k in self._known.values() if k.index == index), None)
            if cached is None:
                return None  # never identified; the probe already recorded why
            probe.note(GpuHealth.DEGRADED, "NVML cannot identify this GPU")
            return _unread(cached, probe.health, probe.reason)
        known = self._known.get(str(uuid))
        name = known.name if known else str(probe.read("nvmlDeviceGetName", handle) or "")
        memory = self._memory(probe, handle)
        total_mib = units.bytes_to_mib(memory[0]) if memory else (known.total_mib if known else 0)
        identity = self._known[str(uuid)] = _Identity(index, str(uuid), name, total_mib)
        if memory is None:
            probe.note(GpuHealth.DEGRADED, "the driver reports no memory usage for this GPU")
            return _unread(identity, probe.health, probe.reason)
        processes = _processes(probe, handle)
        util = probe.read("nvmlDeviceGetUtilizationRates", handle)
        temp = probe.read("nvmlDeviceGetTemperature", handle, nvml.NVML_TEMPERATURE_GPU)
        power_mw = probe.read("nvmlDeviceGetPowerUsage", handle)
        ecc = probe.read(
            "nvmlDeviceGetTotalEccErrors",
            handle,
            nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
            nvml.NVML_VOLATILE_ECC,
        )
        if ecc:
            probe.note(GpuHealth.DEGRADED, f"{int(ecc)} uncorrectable ECC errors")
        if probe.lost:
            return _unread(identity, probe.health, probe.reason)
        _, reserved, used, free = (units.bytes_to_mib(n) for n in memory)
        return GpuSnapshot(
            index=index,
            uuid=identity.uuid,
            name=name,
            total_mib=total_mib,
            reserved_mib=reserved,
            used_mib=used,
            free_mib=free,
            processes=processes,
            utilization_pct=None if util is None else int(util.gpu),
            temperature_c=None if temp is None else int(temp),
            power_w=None if power_mw is None else int(power_mw) / 1000,
            ecc_uncorrected=None if ecc is None else int(ecc),
            health=probe.health,
            health_reason=probe.reason,
        )

    def _memory(self, probe: _Probe, handle: Any) -> tuple[int, int, int, int] | None:  # noqa: ANN401
        """Read (total, reserved, used, free) bytes; v2 semantics (used excludes reserved)."""
        nvml = self._nvml
        version = getattr(nvml, "nvmlMemory_v2", None)
        if version is not None and not self._memory_v1:
            try:
                mem = nvml.nvmlDeviceGetMemoryInfo(handle, version=version)
                return int(mem.total), int(mem.reserved), int(mem.used), int(mem.free)
            except nvml.NVMLError as err:
                if _error_name(err) != nvml_errors.FUNCTION_NOT_FOUND_ERROR:
                    probe.fail("nvmlDeviceGetMemoryInfo", err)
                    return None
                self._memory_v1 = True  # old driver: v1 counts the reservation as used
        mem = probe.read("nvmlDeviceGetMemoryInfo", handle)
        return None if mem is None else (int(mem.total), 0, int(mem.used), int(mem.free))

    def _wait_sync(self, timeout_s: float) -> tuple[list[_RawEvent], str | None]:
        deadline = time.monotonic() + timeout_s
        raw: list[_RawEvent] = []
        with self._event_lock:
            if self._event_set is None:  # no events on this host: just wait out the timeout
                self._stop.wait(timeout_s)
                return raw, None
            try:
                while not raw and not self._stop.is_set():
                    slice_ms = max(0, min(_SLICE_MS, int((deadline - time.monotonic()) * 1000)))
                    if (event := self._wait_once(slice_ms)) is not None:
                        raw.append(event)
                    elif slice_ms == 0 or time.monotonic() >= deadline:
                        break
                while raw and len(raw) <= _MAX_DRAIN and (event := self._wait_once(0)) is not None:
                    raw.append(event)
            except self._nvml.NVMLError as err:
                if self._wait_failed:  # failing again: pace the caller instead of spinning
                    self._stop.wait(max(0.0, deadline - time.monotonic()))
                self._wait_failed = True
                return raw, str(err)
        self._wait_failed = False
        return raw, None

    def _wait_once(self, timeout_ms: int) -> _RawEvent | None:
        """One nvmlEventSetWait_v2: the event, None on Timeout; other NVMLErrors propagate."""
        nvml = self._nvml
        try:
            data = nvml.nvmlEventSetWait_v2(self._event_set, timeout_ms)
        except nvml.NVMLError as err:
            if _error_name(err) == nvml_errors.TIMEOUT_ERROR:
                return None
            raise
        try:
            uuid: str | None = str(nvml.nvmlDeviceGetUUID(data.device))
        except nvml.NVMLError:
            uuid = None  # e.g. XID 79: the GPU is already gone; a snapshot will name it
        return uuid, int(data.eventType), int(data.eventData)

    def _close_sync(self) -> None:
        nvml = self._nvml
        if self._event_lock.acquire(timeout=_CLOSE_WAIT_S):
            try:
                if self._event_set is not None:
                    with contextlib.suppress(nvml.NVMLError):
                        nvml.nvmlEventSetFree(self._event_set)
                    self._event_set = None
            finally:
                self._event_lock.release()
        # else a wait is stuck in the driver: leak the set rather than free it under the waiter
        snapshot_done = self._query_lock.acquire(timeout=_CLOSE_WAIT_S)
        try:
            with contextlib.suppress(nvml.NVMLError):
                nvml.nvmlShutdown()
        finally:
            if snapshot_done:
                self._query_lock.release()

    # --- event-loop side ---

    def _to_event(self, raw: _RawEvent) -> GpuEvent | None:
        uuid, event_type, data = raw
        kind = self._event_kinds.get(event_type)
        if kind is None:
            return None
        sticky = nvml_errors.event_health(kind, data)
        if uuid is not None and kind is GpuEventKind.LOST:
            self._reported_lost.add(uuid)
        current = self._sticky.get(uuid or "", (GpuHealth.HEALTHY, ""))[0]
        if uuid is not None and sticky is not None and nvml_errors.is_worse(sticky[0], current):
            self._sticky[uuid] = sticky
        xid = data if kind is GpuEventKind.XID else None
        return GpuEvent(uuid or "", kind, xid=xid, detail=nvml_errors.event_detail(kind, data))

    def _with_sticky_health(self, gpu: GpuSnapshot) -> GpuSnapshot:
        health, reason = self._sticky.get(gpu.uuid, (GpuHealth.HEALTHY, ""))
        if nvml_errors.is_worse(health, gpu.health):
            return dataclasses.replace(gpu, health=health, health_reason=reason)
        return gpu


def _processes(probe: _Probe, handle: Any) -> tuple[GpuProcess, ...]:  # noqa: ANN401
    """Compute and graphics processes, one entry per pid (compute wins)."""
    seen: dict[int, GpuProcess] = {}
    for call in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        for proc in probe.read(call, handle) or ():
            pid, used = int(proc.pid), proc.usedGpuMemory
            if pid not in seen:
                used_mib = None if used is None else units.bytes_to_mib(int(used))
                seen[pid] = GpuProcess(pid=pid, used_mib=used_mib)
    return tuple(seen.values())


def _unread(identity: _Identity, health: GpuHealth, reason: str) -> GpuSnapshot:
    """Show a GPU NVML could not read: identity from the cache, no memory to offer."""
    return GpuSnapshot(
        index=identity.index,
        uuid=identity.uuid,
        name=identity.name,
        total_mib=identity.total_mib,
        reserved_mib=0,
        used_mib=0,
        free_mib=0,
        health=health,
        health_reason=reason,
    )
