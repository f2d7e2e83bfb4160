"""Memory unit conversions in one place, so every number a user sees uses the same rounding.

Config speaks GiB (what people write), NVML speaks bytes, and fleetd computes in whole MiB
(integers: exact sums, no float drift in the planner). Text shown to people is GiB, one decimal.
"""

from __future__ import annotations

import math

MIB = 1024 * 1024
MIB_PER_GIB = 1024


def gib_to_mib(gib: float) -> int:
    """Convert a configured GiB amount to MiB, rounding up so a budget is never understated."""
    return math.ceil(round(gib * MIB_PER_GIB, 6))


def bytes_to_mib(n_bytes: int) -> int:
    """Convert an NVML byte count to MiB, rounding down (what is certainly there)."""
    return n_bytes // MIB


def fmt_gib(mib: float) -> str:
    """Render MiB as GiB with one decimal, e.g. ``16384`` -> ``"16.0 GiB"``."""
    return f"{mib / MIB_PER_GIB:.1f} GiB"
