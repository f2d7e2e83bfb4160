"""Worker states and the only transitions allowed between them.

A worker is one engine process on one GPU (a ``vllm serve`` per replica, an ``ollama serve``
per GPU), and an Ollama model slot inside such a process uses the same states. The table is
the contract: the supervisor's single ``_set_state`` checks it and emits an event for every
change, so the log, the metrics and ``fleetctl events`` all tell the same story.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping


class WorkerState(enum.StrEnum):
    """Lifecycle of a worker (or of an Ollama model slot)."""

    STOPPED = "stopped"  # no process
    STARTING = "starting"  # process launched (or model loading), not yet healthy
    READY = "ready"  # health check passed: routable
    DRAINING = "draining"  # not routable; waiting for in-flight requests to finish
    STANDBY = "standby"  # a warm standby asleep (vLLM sleep mode): not routable, little VRAM
    STOPPING = "stopping"  # SIGTERM sent (or unload requested); waiting for the exit
    BACKOFF = "backoff"  # it died or failed to start; waiting before the next try
    FAILED = "failed"  # crash loop or permanent error: needs an operator or a new plan


TRANSITIONS: Mapping[WorkerState, frozenset[WorkerState]] = {
    # READY: an adopted engine that already answers; BACKOFF: a start deferred for memory
    WorkerState.STOPPED: frozenset({WorkerState.STARTING, WorkerState.READY, WorkerState.BACKOFF}),
    # asleep; READY again when woken (a failover), or it stops / dies like any engine
    WorkerState.STANDBY: frozenset(
        {WorkerState.READY, WorkerState.STOPPING, WorkerState.BACKOFF, WorkerState.FAILED}
    ),
    WorkerState.STARTING: frozenset(
        {WorkerState.READY, WorkerState.STOPPING, WorkerState.BACKOFF, WorkerState.FAILED}
    ),
    WorkerState.READY: frozenset(
        {
            WorkerState.DRAINING,
            WorkerState.STOPPING,
            WorkerState.BACKOFF,
            WorkerState.FAILED,
            WorkerState.STANDBY,
        }
    ),
    WorkerState.DRAINING: frozenset(
        {WorkerState.STOPPING, WorkerState.READY, WorkerState.BACKOFF, WorkerState.FAILED}
    ),
    WorkerState.STOPPING: frozenset({WorkerState.STOPPED, WorkerState.BACKOFF, WorkerState.FAILED}),
    WorkerState.BACKOFF: frozenset({WorkerState.STARTING, WorkerState.STOPPED, WorkerState.FAILED}),
    WorkerState.FAILED: frozenset({WorkerState.STARTING, WorkerState.STOPPED}),
}

RUNNING_STATES = frozenset(
    {WorkerState.STARTING, WorkerState.READY, WorkerState.DRAINING, WorkerState.STANDBY}
)
ROUTABLE_STATES = frozenset({WorkerState.READY})


class StopReason(enum.StrEnum):
    """Why fleetd stopped a worker (recorded on the event and in metrics)."""

    DESIRED_REMOVED = "desired_removed"  # scaled down / removed from config
    MOVED = "moved"  # the plan puts it elsewhere
    PREEMPTED = "preempted"  # a higher-priority model needs the memory
    UNHEALTHY = "unhealthy"  # hung: health probes failed
    START_TIMEOUT = "start_timeout"  # never became healthy in time
    GPU_UNUSABLE = "gpu_unusable"  # its GPU is lost or drained
    OPERATOR = "operator"  # fleetctl restart / drain
    RESPEC = "respec"  # the config changed how it runs: restart with the new spec
    DAEMON_EXIT = "daemon_exit"  # fleetd is shutting down


class InvalidTransitionError(Exception):
    """A state change the table does not allow: a bug in fleetd, never a user error."""


def check_transition(old: WorkerState, new: WorkerState) -> None:
    """Raise InvalidTransitionError unless ``old -> new`` is in the table."""
    if new not in TRANSITIONS[old]:
        raise InvalidTransitionError(f"worker cannot go from {old} to {new}")


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """A read-only view of a worker for readers (control API, reconciler, gateway)."""

    name: str
    engine: str
    gpu_uuid: str
    gpu_index: int
    state: WorkerState
    reason: str
    port: int | None
    pid: int | None
    restarts: int
    since_s: float  # monotonic time of the last state change
    models: tuple[str, ...]  # models served (vLLM: one; Ollama: those loaded)
    budget_mib: int
