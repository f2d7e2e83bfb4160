"""A fake ``pynvml`` module: the real one's names, return shapes and exceptions, scripted.

Install it with ``monkeypatch.setitem(sys.modules, "pynvml", fake)``. Names, constants and
error strings follow nvidia-ml-py 13.615.71 (shared/reference/engines-nvml-systemd.md, C):
``NVMLError(code)`` returns the ``NVMLError_<Name>`` subclass, subclasses can be raised with no
arguments, instances are unhashable, and handles are neither hashable nor equal to each other
(like ctypes pointers), so code under test cannot key anything by handle.

The state is plain data: ``devices`` (``FakeDevice``), ``fail()`` to make a call raise for one
device or all, ``push_event()`` / ``push_wait_error()`` for ``nvmlEventSetWait_v2``. Every call
is recorded with the thread that made it, so a test can prove none ran on the event loop.
"""

# The fake must spell pynvml's camelCase function names exactly.
# ruff: noqa: N802

from __future__ import annotations

import dataclasses
import re
import threading
import types
from collections import deque
from typing import Any, ClassVar, TypeAlias

MIB = 1024 * 1024
GIB = 1024 * MIB

# NVML_ERROR_* as class-name suffix -> (code, str()). The strings are pynvml's own table; for
# codes pynvml asks the library about (marked *), they are close to what libnvidia-ml says.
_ERRORS = {
    "Uninitialized": (1, "Uninitialized"),
    "InvalidArgument": (2, "Invalid Argument"),
    "NotSupported": (3, "Not Supported"),
    "NoPermission": (4, "Insufficient Permissions"),
    "AlreadyInitialized": (5, "Already Initialized"),
    "NotFound": (6, "Not Found"),
    "InsufficientSize": (7, "Insufficient Size"),
    "InsufficientPower": (8, "Insufficient External Power"),
    "DriverNotLoaded": (9, "Driver Not Loaded"),
    "Timeout": (10, "Timeout"),
    "IrqIssue": (11, "Interrupt Request Issue"),
    "LibraryNotFound": (12, "NVML Shared Library Not Found"),
    "FunctionNotFound": (13, "Function Not Found"),
    "CorruptedInforom": (14, "Corrupted infoROM"),
    "GpuIsLost": (15, "GPU is lost"),
    "ResetRequired": (16, "GPU requires restart"),
    "OperatingSystem": (17, "The operating system has blocked the request."),
    "LibRmVersionMismatch": (18, "RM has detected an NVML/RM version mismatch."),
    "InUse": (19, "In use by another client"),  # *
    "Memory": (20, "Insufficient Memory"),
    "NoData": (21, "No data"),  # *
    "VgpuEccNotSupported": (22, "vGPU ECC not supported"),  # *
    "InsufficientResources": (23, "Insufficient resources"),  # *
    "FreqNotSupported": (24, "Frequency not supported"),  # *
    "ArgumentVersionMismatch": (25, "Argument version mismatch"),  # *
    "Deprecated": (26, "Deprecated"),  # *
    "NotReady": (27, "Not ready"),  # *
    "GpuNotFound": (28, "GPU not found"),  # *
    "InvalidState": (29, "Invalid state"),  # *
    "ResetTypeNotSupported": (30, "Reset type not supported"),  # *
    "Unknown": (999, "Unknown Error"),
}
_MESSAGES = dict(_ERRORS.values())


class NVMLError(Exception):  # noqa: PLW1641 - __eq__ without __hash__: unhashable, as in pynvml
    """pynvml's base error: ``NVMLError(code)`` is an instance of the matching subclass."""

    _by_value: ClassVar[dict[int, type[NVMLError]]] = {}
    value: int

    def __new__(cls, value: int = 999) -> NVMLError:  # noqa: PYI034 - returns the code's subclass
        if cls is NVMLError:
            cls = NVMLError._by_value.get(value, cls)  # noqa: PLW0642 - mirrors pynvml
        obj = Exception.__new__(cls)
        obj.value = value
        return obj

    def __str__(self) -> str:
        return _MESSAGES.get(self.value, f"NVML Error with code {self.value}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NVMLError) and self.value == other.value


class NVMLLibraryMismatchError(Exception):
    """Raised by versioned pynvml calls the driver lacks; not an NVMLError (as in pynvml)."""


def _error_class(name: str, code: int) -> type[NVMLError]:
    def new(cls: type[NVMLError], *_args: object) -> NVMLError:
        return NVMLError.__new__(cls, code)

    return type(f"NVMLError_{name}", (NVMLError,), {"__new__": new, "__module__": __name__})


ERROR_CLASSES = {f"NVMLError_{n}": _error_class(n, code) for n, (code, _) in _ERRORS.items()}
NVMLError._by_value.update({cls().value: cls for cls in ERROR_CLASSES.values()})


def error(name: str) -> NVMLError:
    """An instance of ``NVMLError_<name>``, e.g. ``error("GpuIsLost")``."""
    return ERROR_CLASSES[f"NVMLError_{name}"]()


EVENT_SBE = 0x1
EVENT_DBE = 0x2
EVENT_XID = 0x8
EVENT_UNAVAILABLE = 0x4000
ALL_EVENTS = EVENT_SBE | EVENT_DBE | EVENT_XID | EVENT_UNAVAILABLE


def _snake(camel: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).upper()  # GpuIsLost -> GPU_IS_LOST


_CONSTANTS: dict[str, object] = {
    "NVML_SUCCESS": 0,
    "nvmlMemory_v2": 0x02000028,
    "NVML_TEMPERATURE_GPU": 0,
    "NVML_MEMORY_ERROR_TYPE_CORRECTED": 0,
    "NVML_MEMORY_ERROR_TYPE_UNCORRECTED": 1,
    "NVML_VOLATILE_ECC": 0,
    "NVML_AGGREGATE_ECC": 1,
    "nvmlEventTypeSingleBitEccError": EVENT_SBE,
    "nvmlEventTypeDoubleBitEccError": EVENT_DBE,
    "nvmlEventTypePState": 0x4,
    "nvmlEventTypeXidCriticalError": EVENT_XID,
    "nvmlEventTypeClock": 0x10,
    "nvmlEventTypeGpuUnavailableError": EVENT_UNAVAILABLE,
    "nvmlEventTypeGpuRecoveryAction": 0x8000,
    **{f"NVML_ERROR_{_snake(n)}": code for n, (code, _) in _ERRORS.items()},
    **ERROR_CLASSES,
    "NVMLError": NVMLError,
    "NVMLLibraryMismatchError": NVMLLibraryMismatchError,
}


@dataclasses.dataclass(eq=False)
class FakeDevice:
    """One GPU. Sensors set to None raise NotSupported, as on cards without them."""

    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    total_bytes: int = 80 * GIB
    reserved_bytes: int = 512 * MIB
    used_bytes: int = 0  # allocated, excluding the reservation (v2 semantics)
    compute_processes: list[tuple[int, int | None]] = dataclasses.field(default_factory=list)
    graphics_processes: list[tuple[int, int | None]] = dataclasses.field(default_factory=list)
    utilization_pct: int | None = 0
    temperature_c: int | None = 35
    power_mw: int | None = 70_000
    ecc_uncorrected: int | None = 0
    supported_events: int = ALL_EVENTS


class _Handle:  # noqa: PLW1641 - unhashable, like a ctypes pointer
    """Like ``c_nvmlDevice_t``: unhashable, equal only to itself; a fresh one per lookup."""

    def __init__(self, device: FakeDevice) -> None:
        self.device = device

    def __eq__(self, other: object) -> bool:
        return self is other


@dataclasses.dataclass(eq=False)
class FakeEventSet:
    registrations: list[tuple[FakeDevice, int]] = dataclasses.field(default_factory=list)
    freed: bool = False


_Queued: TypeAlias = tuple[FakeDevice, int, int] | str  # (device, eventType, eventData) or error


class FakePynvml(types.ModuleType):
    """The fake module. Tests script it through ``devices``, ``fail`` and ``push_event``."""

    max_wait_s = 0.02  # a wait sleeps at most this long before Timeout, whatever it was asked

    def __init__(self, devices: list[FakeDevice] | None = None) -> None:
        super().__init__("pynvml")
        self.__dict__.update(_CONSTANTS)  # on the instance, so a test can delattr one
        self.devices = [FakeDevice("GPU-0000")] if devices is None else devices
        self.driver_version = "570.124.06"
        self.faults: dict[tuple[str, int | None], str] = {}
        self.calls: list[tuple[str, int]] = []  # (function, threading.get_ident())
        self.init_count = 0
        self.shutdown_calls = 0
        self.event_sets: list[FakeEventSet] = []
        self.waiting = threading.Event()  # set once a thread is inside nvmlEventSetWait_v2
        self.wait_timeouts_ms: list[int] = []
        self._queue: deque[_Queued] = deque()
        self._cond = threading.Condition()

    # --- scripting ---

    def fail(self, call: str, error_name: str, *, device: int | None = None) -> None:
        """Make ``call`` raise ``NVMLError_<error_name>`` (for one device index, or always)."""
        self.faults[call, device] = error_name

    def heal(self, call: str, *, device: int | None = None) -> None:
        self.faults.pop((call, device), None)

    def lose(self, device: int) -> None:
        """Every call about this device raises GpuIsLost (it fell off the bus)."""
        self.fail("*", "GpuIsLost", device=device)

    def push_event(self, device: int, event_type: int, data: int = 0) -> None:
        with self._cond:
            self._queue.append((self.devices[device], event_type, data))
            self._cond.notify_all()

    def push_wait_error(self, error_name: str) -> None:
        with self._cond:
            self._queue.append(error_name)
            self._cond.notify_all()

    def call_threads(self) -> set[int]:
        return {ident for _, ident in self.calls}

    def call_names(self) -> list[str]:
        return [name for name, _ in self.calls]

    # --- plumbing ---

    def _enter(self, call: str, device: FakeDevice | None = None, *aliases: str) -> FakeDevice:
        """Record the call, then raise what the script says: Uninitialized, lost, injected."""
        self.calls.append((call, threading.get_ident()))
        if call != "nvmlInit" and self.init_count == 0:
            raise error("Uninitialized")
        index = None
        if device is not None:
            found = [i for i, d in enumerate(self.devices) if d is device]
            if not found:
                raise error("GpuIsLost")  # the handle's GPU is no longer enumerated
            index = found[0]
        keys = [(name, idx) for name in (call, *aliases) for idx in (index, None)]
        for key in [*keys, ("*", index)] if index is not None else keys:
            if key in self.faults:
                raise error(self.faults[key])
        return device if device is not None else FakeDevice("")

    @staticmethod
    def _sensor(value: int | None) -> int:
        if value is None:
            raise error("NotSupported")
        return value

    # --- the pynvml API ---

    def nvmlInit(self) -> None:
        self._enter("nvmlInit")
        self.init_count += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.init_count -= 1
        self.shutdown_calls += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        return self.driver_version

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        if index >= len(self.devices):
            self._enter("nvmlDeviceGetHandleByIndex")
            raise error("InvalidArgument")
        return _Handle(self._enter("nvmlDeviceGetHandleByIndex", self.devices[index]))

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:
        return self._enter("nvmlDeviceGetUUID", handle.device).uuid

    def nvmlDeviceGetName(self, handle: _Handle) -> str:
        return self._enter("nvmlDeviceGetName", handle.device).name

    def nvmlDeviceGetMemoryInfo(self, handle: _Handle, version: int | None = None) -> Any:
        if not version:
            dev = self._enter("nvmlDeviceGetMemoryInfo", handle.device)
            used = dev.reserved_bytes + dev.used_bytes  # v1: used includes the reservation
            return types.SimpleNamespace(total=dev.total_bytes, used=used, free=_free(dev))
        dev = self._enter("nvmlDeviceGetMemoryInfo", handle.device, "nvmlDeviceGetMemoryInfo_v2")
        return types.SimpleNamespace(
            version=version,
            total=dev.total_bytes,
            reserved=dev.reserved_bytes,
            used=dev.used_bytes,
            free=_free(dev),
        )

    def nvmlDeviceGetComputeRunningProcesses(self, handle: _Handle) -> list[Any]:
        dev = self._enter("nvmlDeviceGetComputeRunningProcesses", handle.device)
        return [_process(pid, used) for pid, used in dev.compute_processes]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: _Handle) -> list[Any]:
        dev = self._enter("nvmlDeviceGetGraphicsRunningProcesses", handle.device)
        return [_process(pid, used) for pid, used in dev.graphics_processes]

    def nvmlDeviceGetUtilizationRates(self, handle: _Handle) -> Any:
        pct = self._sensor(
            self._enter("nvmlDeviceGetUtilizationRates", handle.device).utilization_pct
        )
        return types.SimpleNamespace(gpu=pct, memory=pct // 2)

    def nvmlDeviceGetTemperature(self, handle: _Handle, sensor: int) -> int:
        dev = self._enter("nvmlDeviceGetTemperature", handle.device)
        if sensor != 0:
            raise error("InvalidArgument")
        return self._sensor(dev.temperature_c)

    def nvmlDeviceGetPowerUsage(self, handle: _Handle) -> int:
        return self._sensor(self._enter("nvmlDeviceGetPowerUsage", handle.device).power_mw)

    def nvmlDeviceGetTotalEccErrors(self, handle: _Handle, error_type: int, counter: int) -> int:
        dev = self._enter("nvmlDeviceGetTotalEccErrors", handle.device)
        count = self._sensor(dev.ecc_uncorrected)
        if error_type not in (0, 1) or counter not in (0, 1):
            raise error("InvalidArgument")
        return count if error_type == 1 else 0

    def nvmlEventSetCreate(self) -> FakeEventSet:
        self._enter("nvmlEventSetCreate")
        self.event_sets.append(FakeEventSet())
        return self.event_sets[-1]

    def nvmlDeviceGetSupportedEventTypes(self, handle: _Handle) -> int:
        return self._enter("nvmlDeviceGetSupportedEventTypes", handle.device).supported_events

    def nvmlDeviceRegisterEvents(self, handle: _Handle, types_: int, event_set: Any) -> None:
        dev = self._enter("nvmlDeviceRegisterEvents", handle.device)
        if types_ & ~dev.supported_events:
            raise error("NotSupported")
        event_set.registrations.append((dev, types_))

    def nvmlEventSetWait_v2(self, event_set: FakeEventSet, timeout_ms: int) -> Any:
        self._enter("nvmlEventSetWait_v2")
        if event_set.freed:
            raise error("InvalidArgument")
        self.wait_timeouts_ms.append(timeout_ms)
        self.waiting.set()
        with self._cond:
            self._cond.wait_for(lambda: bool(self._queue), min(timeout_ms / 1000, self.max_wait_s))
            while self._queue:
                item = self._queue.popleft()
                if isinstance(item, str):
                    raise error(item)
                dev, event_type, data = item
                if any(d is dev and m & event_type for d, m in event_set.registrations):
                    return types.SimpleNamespace(
                        device=_Handle(dev),
                        eventType=event_type,
                        eventData=data,
                        gpuInstanceId=0xFFFFFFFF,
                        computeInstanceId=0xFFFFFFFF,
                    )
        raise error("Timeout")

    def nvmlEventSetWait(self, event_set: FakeEventSet, timeout_ms: int) -> Any:
        return self.nvmlEventSetWait_v2(event_set, timeout_ms)

    def nvmlEventSetFree(self, event_set: FakeEventSet) -> None:
        self._enter("nvmlEventSetFree")
        if event_set.freed:
            raise error("InvalidArgument")
        event_set.freed = True


def _free(dev: FakeDevice) -> int:
    return max(0, dev.total_bytes - dev.reserved_bytes - dev.used_bytes)


def _process(pid: int, used: int | None) -> Any:
    return types.SimpleNamespace(
        pid=pid, usedGpuMemory=used, gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF
    )
