"""Requests in flight per engine instance: what a drain waits for, and least-outstanding's input.

The gateway counts a request against the replica it is attached to, from the moment it is
sent upstream until its last byte reached the client (or the client went away). A draining
worker is idle for the gateway when its count is zero; the engine's own counters cover
requests that did not come through the gateway. Plain dict arithmetic on the event loop: no
locks needed, and cheap enough to sit on every request's path.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator


class Inflight:
    """Counts per target (``"<worker>@<gpu uuid>"``), plus totals for metrics."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self.started = 0
        self.finished = 0

    def count(self, target: str) -> int:
        """Requests in flight at ``target`` now."""
        return self._counts.get(target, 0)

    def total(self) -> int:
        """Requests in flight anywhere."""
        return sum(self._counts.values())

    def snapshot(self) -> dict[str, int]:
        """Every target with requests in flight."""
        return dict(self._counts)

    @contextmanager
    def track(self, target: str) -> Iterator[None]:
        """Count one request at ``target`` for the duration of the ``with`` block."""
        self._counts[target] = self._counts.get(target, 0) + 1
        self.started += 1
        try:
            yield
        finally:
            left = self._counts[target] - 1
            if left:
                self._counts[target] = left
            else:
                del self._counts[target]
            self.finished += 1


def target_id(worker: str, gpu_uuid: str) -> str:
    """The key of one engine instance: names are reused by a replacement on another GPU."""
    return f"{worker}@{gpu_uuid}"
