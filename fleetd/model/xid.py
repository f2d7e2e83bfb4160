"""NVIDIA's XID catalogue reduced to the action fleetd must take.

Source: NVIDIA "Analyzing Xid Errors with the Xid Catalog", column "Resolution Bucket
(Immediate Action)", as summarised in shared/reference/engines-nvml-systemd.md §C.5.
Application-level XIDs restart the affected worker; reset-class XIDs evacuate the GPU.
"""

from __future__ import annotations

import enum

from fleetd.model.gpu import GpuHealth


class XidAction(enum.StrEnum):
    """What an XID asks of the operator (and so of fleetd)."""

    IGNORE = "ignore"  # informational; the GPU stays healthy
    RESTART_APP = "restart_app"  # the application that hit it must restart; the GPU is fine
    RESET_GPU = "reset_gpu"  # the GPU must be reset before work can run there again
    REBOOT = "reboot"  # fell off the bus: only a node reboot / power cycle recovers it
    UNKNOWN = "unknown"  # not in the catalogue summary: alert a human, take no automatic action


_RESTART_APP = frozenset({13, 31, 94})
_IGNORE = frozenset({43, 45, 63, 92, 154})
_RESET_GPU = frozenset({46, 48, 62, 64, 74, 95, 109, 119, 120, 136, 140, 143, 155, 156, 158})
_REBOOT = frozenset({79})


def action_for(xid: int) -> XidAction:
    """Map an XID number to its action.

    Unknown XIDs get UNKNOWN rather than RESET_GPU: evacuating a GPU on a code we cannot
    interpret would let a chatty driver thrash the fleet; a human is alerted instead.
    """
    if xid in _IGNORE:
        return XidAction.IGNORE
    if xid in _RESTART_APP:
        return XidAction.RESTART_APP
    if xid in _REBOOT:
        return XidAction.REBOOT
    if xid in _RESET_GPU:
        return XidAction.RESET_GPU
    return XidAction.UNKNOWN


def health_effect(xid: int) -> tuple[GpuHealth, str] | None:
    """The health an XID forces on its GPU until the GPU is reset; None if it stays usable.

    Reboot- and reset-class XIDs both make it LOST: nothing may run there any more, so the
    planner evacuates it (the reason tells the operator which of the two it needs).
    Application-level XIDs leave the GPU healthy; the daemon restarts the workers there.
    Both GPU backends (NVML and simulated) use this one rule.
    """
    if action_for(xid) in (XidAction.REBOOT, XidAction.RESET_GPU):
        return GpuHealth.LOST, describe(xid)
    return None


def describe(xid: int) -> str:
    """Human text for an XID, e.g. ``"XID 79 (GPU has fallen off the bus): reboot the node"``."""
    name = _NAMES.get(xid)
    label = f"XID {xid} ({name})" if name else f"XID {xid}"
    return f"{label}: {_ADVICE[action_for(xid)]}"


_NAMES = {
    13: "graphics engine exception",
    31: "GPU memory page fault",
    43: "reset channel verification error",
    45: "preemptive removal",
    46: "GPU timeout",
    48: "double-bit ECC error",
    62: "PMU halt",
    63: "row remap event",
    64: "row remap failure",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "excessive single-bit ECC interrupts",
    94: "contained ECC error",
    95: "uncontained ECC error",
    109: "context switch timeout",
    119: "GSP RPC timeout",
    120: "GSP error",
    154: "GPU recovery action changed",
}

_ADVICE = {
    XidAction.IGNORE: "informational, the GPU stays healthy",
    XidAction.RESTART_APP: "the affected worker must restart; the GPU is fine",
    XidAction.RESET_GPU: "the GPU must be reset before work runs there again",
    XidAction.REBOOT: "the node must be rebooted or power-cycled",
    XidAction.UNKNOWN: "not in fleetd's XID catalogue; check the driver log",
}
