"""What NVML's errors and events mean for fleetd: a user's message at start-up, a GPU's health.

pynvml raises one ``NVMLError_<Name>`` subclass per NVML return code. This module maps the
class *name* (so it works for the real module and the test fake alike) to text a user can act
on and to a ``GpuHealth``, and does the same for driver events (XIDs, ECC, GPU unavailable).
It is pure: it must not import pynvml or touch a device.
"""

from __future__ import annotations

from fleetd.model import xid as xid_catalogue
from fleetd.model.gpu import GpuEventKind, GpuHealth

# The GPU cannot be reached at all: nothing runs there until a reset or reboot.
_LOST_ADVICE = {
    "NVMLError_GpuIsLost": "the GPU fell off the bus; check `dmesg` for XID 79 and reboot the node",
    "NVMLError_GpuNotFound": "the driver no longer finds this GPU; check `nvidia-smi` and `dmesg`",
    "NVMLError_ResetRequired": "reset the GPU (`nvidia-smi --gpu-reset -i N`) or reboot the node",
    "NVMLError_Unknown": "NVML reports an unknown error; check `nvidia-smi` and `dmesg`",
}

# A sensor this GPU does not have (or has no sample for yet): the reading is None, not a fault.
ABSENT_ERRORS = frozenset({"NVMLError_NotSupported", "NVMLError_NoData"})

TIMEOUT_ERROR = "NVMLError_Timeout"
FUNCTION_NOT_FOUND_ERROR = "NVMLError_FunctionNotFound"

IMPORT_FAILURE = (
    "the Python module `pynvml` is missing: install the package nvidia-ml-py "
    "(`pip install nvidia-ml-py`, not the unrelated `pynvml` package). "
    "On a machine without GPUs use `--simulate` / `fleetd demo`."
)

_INIT_FAILURES = {
    "NVMLError_LibraryNotFound": (
        "NVML library (libnvidia-ml.so.1) not found: the NVIDIA driver is not installed or not "
        "on the library path. On a machine without GPUs use `--simulate` / `fleetd demo`."
    ),
    "NVMLError_DriverNotLoaded": (
        "the NVIDIA kernel driver is not loaded (NVML: Driver Not Loaded). Check `nvidia-smi` "
        "and `lsmod | grep nvidia`; load it with `sudo modprobe nvidia` or reinstall the driver."
    ),
    "NVMLError_NoPermission": (
        "NVML was refused access to the GPUs (NVML: Insufficient Permissions). The service user "
        "needs read/write access to /dev/nvidiactl, /dev/nvidia-uvm and /dev/nvidia0, "
        "/dev/nvidia1, ...: add it to the `video` and `render` groups "
        "(`usermod -aG video,render <user>`)."
    ),
    "NVMLError_LibRmVersionMismatch": (
        "the NVML library and the loaded kernel driver have different versions (the driver was "
        "upgraded without a reboot): reboot the node or reload the nvidia kernel modules."
    ),
}


def init_failure_message(error_name: str, detail: str) -> str:
    """Explain to the user why NVML cannot start, e.g. for ``NVMLError_DriverNotLoaded``."""
    known = _INIT_FAILURES.get(error_name)
    if known is not None:
        return known
    return f"NVML failed to start ({detail}); check that `nvidia-smi` works for the service user."


def is_lost(error_name: str) -> bool:
    """Whether this error means the GPU is unreachable (so further queries are pointless)."""
    return error_name in _LOST_ADVICE


def query_failure(error_name: str, detail: str, *, call: str) -> tuple[GpuHealth, str]:
    """Health and reason for a failed query: LOST for unreachable GPUs, else DEGRADED."""
    advice = _LOST_ADVICE.get(error_name)
    if advice is not None:
        return GpuHealth.LOST, f"{detail} ({call}): {advice}"
    if error_name == TIMEOUT_ERROR:
        return GpuHealth.DEGRADED, f"{call} timed out: the GPU or driver is not responding"
    return GpuHealth.DEGRADED, f"{call} failed: {detail}"


# pynvml event-type constant -> kind; fleetd registers for exactly these
EVENT_TYPES = {
    "nvmlEventTypeXidCriticalError": GpuEventKind.XID,
    "nvmlEventTypeDoubleBitEccError": GpuEventKind.ECC_DOUBLE_BIT,
    "nvmlEventTypeSingleBitEccError": GpuEventKind.ECC_SINGLE_BIT,
    "nvmlEventTypeGpuUnavailableError": GpuEventKind.LOST,
}
_EVENT_DETAIL = {
    GpuEventKind.ECC_DOUBLE_BIT: "double-bit (uncorrectable) ECC error",
    GpuEventKind.ECC_SINGLE_BIT: "single-bit (corrected) ECC error",
    GpuEventKind.LOST: "the driver reports the GPU as unavailable",
}


def event_detail(kind: GpuEventKind, data: int) -> str:
    """Human text for an event; ``data`` is the XID number for XID events."""
    return xid_catalogue.describe(data) if kind is GpuEventKind.XID else _EVENT_DETAIL[kind]


def event_health(kind: GpuEventKind, data: int) -> tuple[GpuHealth, str] | None:
    """Health an event forces on its GPU until the backend reopens; None if the GPU stays fine.

    GPU-unavailable events make it LOST; XIDs as ``xid.health_effect`` says (reboot- and
    reset-class XIDs: LOST, so the GPU is evacuated).
    ECC events need no sticky state: the uncorrected ECC counter in each snapshot covers them.
    """
    if kind is GpuEventKind.LOST:
        return GpuHealth.LOST, _EVENT_DETAIL[kind]
    if kind is not GpuEventKind.XID:
        return None
    return xid_catalogue.health_effect(data)


_RANK = {GpuHealth.HEALTHY: 0, GpuHealth.DEGRADED: 1, GpuHealth.LOST: 2}


def is_worse(new: GpuHealth, old: GpuHealth) -> bool:
    """Whether ``new`` is a worse health than ``old`` (LOST > DEGRADED > HEALTHY)."""
    return _RANK[new] > _RANK[old]
