"""Time as a boundary: supervisors read the monotonic clock and sleep only through ``Clock``.

The real clock is the event loop's; tests use ``fleetd.testing.ManualClock`` to step time.
Wall-clock time is never used for durations.
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class Clock(Protocol):
    """Monotonic time and sleeping."""

    def monotonic(self) -> float:
        """Seconds on a monotonic clock."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` (cancellable)."""
        ...


class LoopClock:
    """The event loop's monotonic clock."""

    def monotonic(self) -> float:
        """``loop.time()``."""
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        """``asyncio.sleep``."""
        await asyncio.sleep(max(0.0, seconds))
