"""The one place a worker's (or model slot's) state changes: checked, evented, waitable.

``StateOwner`` is the base of ``ProcessWorker`` and ``OllamaSlot``. Only their owner task
calls ``_set_state``; everyone else reads ``state`` or awaits ``wait_for``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from fleetd.model.worker import WorkerState, check_transition

if TYPE_CHECKING:
    from fleetd.obs.events import EventBus
    from fleetd.runtime.clock import Clock


class StateOwner:
    """State, reason and the time of the last change, plus the event for every change."""

    def __init__(self, name: str, *, kind: str, clock: Clock, bus: EventBus, **labels: Any) -> None:  # noqa: ANN401
        self.name = name
        self._kind = kind
        self._clock = clock
        self._bus = bus
        self._labels = labels
        self._state = WorkerState.STOPPED
        self._reason = "created"
        self._since = clock.monotonic()
        self._changed = asyncio.Condition()

    @property
    def state(self) -> WorkerState:
        """Current state."""
        return self._state

    @property
    def reason(self) -> str:
        """Why it is in that state."""
        return self._reason

    async def _set_state(self, new: WorkerState, reason: str, **fields: Any) -> None:  # noqa: ANN401
        old = self._state
        check_transition(old, new)
        self._state = new
        self._reason = reason
        self._since = self._clock.monotonic()
        self._bus.emit(
            f"{self._kind}.state_changed",
            f"{self.name}: {old} -> {new}: {reason}",
            **{self._kind: self.name},
            **self._labels,
            old=old.value,
            new=new.value,
            reason=reason,
            **fields,
        )
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, *states: WorkerState, timeout_s: float | None = None) -> WorkerState:
        """Wait until the state is one of ``states``; returns it. TimeoutError after timeout_s."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: self._state in states)
            return self._state
