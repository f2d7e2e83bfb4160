"""Events are the spine of fleetd: every state change, decision, fault and operator action.

An ``Event`` is published once to the ``EventBus``; the bus logs it through structlog, keeps
the most recent ones for ``fleetctl events``, and fans it out to subscribers (metrics, alert
hooks, tests) through bounded queues, so a slow consumer can never block supervision: when a
subscriber's queue is full its oldest events are dropped and counted.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable

_log = structlog.get_logger("fleetd.events")


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened. ``kind`` is dotted (``worker.state_changed``, ``gpu.lost``)."""

    kind: str
    message: str
    seq: int = 0
    ts: float = 0.0  # wall-clock seconds since the epoch (for people), set by the bus
    fields: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON form (for the control API, hooks and logs)."""
        return {
            "seq": self.seq,
            "ts": self.ts,
            "kind": self.kind,
            "message": self.message,
            **self.fields,
        }


class Subscription:
    """A bounded queue of events for one consumer."""

    def __init__(self, bus: EventBus, maxsize: int) -> None:
        self._bus = bus
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self.dropped = 0

    def _offer(self, event: Event) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(event)

    async def get(self) -> Event:
        """The next event (waits)."""
        return await self._queue.get()

    def get_nowait(self) -> Event | None:
        """The next event if one is queued."""
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    def close(self) -> None:
        """Stop receiving events."""
        self._bus._subs.discard(self)  # noqa: SLF001 - the bus and its subscriptions are one unit

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Event]:
        while True:
            yield await self.get()


class EventBus:
    """Publishes events; must be used from the event loop thread."""

    def __init__(self, *, history: int = 2000) -> None:
        self._seq = itertools.count(1)
        self._history: collections.deque[Event] = collections.deque(maxlen=history)
        self._subs: set[Subscription] = set()

    def emit(self, kind: str, message: str, **fields: Any) -> Event:  # noqa: ANN401 - JSON fields
        """Record, log and fan out one event; returns it."""
        event = Event(
            kind=kind, message=message, seq=next(self._seq), ts=time.time(), fields=fields
        )
        self._history.append(event)
        level = "warning" if _is_problem(kind) else "info"
        getattr(_log, level)(kind, msg=message, **fields)
        for sub in tuple(self._subs):
            sub._offer(event)  # noqa: SLF001
        return event

    def subscribe(self, *, maxsize: int = 10_000) -> Subscription:
        """A new subscription receiving every event from now on."""
        sub = Subscription(self, maxsize)
        self._subs.add(sub)
        return sub

    def recent(self, *, since_seq: int = 0, kinds: Iterable[str] = ()) -> list[Event]:
        """Events still in history with seq > since_seq, optionally filtered by kind prefix."""
        prefixes = tuple(kinds)
        return [
            e
            for e in self._history
            if e.seq > since_seq and (not prefixes or e.kind.startswith(prefixes))
        ]


_PROBLEM_WORDS = (
    "failed",
    "crashed",
    "lost",
    "hung",
    "error",
    "over_budget",
    "refused",
    "degraded",
    "flapping",
)


def _is_problem(kind: str) -> bool:
    return any(word in kind for word in _PROBLEM_WORDS)
