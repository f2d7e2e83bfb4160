"""Inputs and outputs of the placement planner, as frozen data.

The planner is a pure function of these; the reconciler (and ``fleetd plan``) build the
inputs from config, operator overrides and GPU observations, and act on (or print) the output.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

    from fleetd.model.gpu import GpuHealth, GpuProcess


STANDBY_REPLICA = 64
"""The replica number of a model's warm standby (config replicas are 0-63)."""


@dataclass(frozen=True, slots=True)
class Overrides:
    """Operator decisions layered on top of the config (fleetctl scale/cordon/drain)."""

    replicas: dict[str, int] = field(default_factory=dict)  # model name -> replicas wanted
    cordoned: frozenset[str] = frozenset()  # GPU UUIDs: keep what runs, place nothing new
    drained: frozenset[str] = frozenset()  # GPU UUIDs: move everything off
    drained_models: frozenset[str] = frozenset()  # models with every replica stopped
    avoid: frozenset[tuple[str, int, str]] = frozenset()  # (model, replica, GPU UUID): move off
    fault_cordoned: frozenset[str] = frozenset()  # those of `cordoned` fleetd set after a fault
    cordon_reasons: Mapping[str, str] = field(default_factory=dict)  # GPU UUID -> why (not saved)

    def wanted(self, model: str, configured: int) -> int:
        """Replicas wanted for a model once the overrides apply."""
        if model in self.drained_models:
            return 0
        return self.replicas.get(model, configured)


@dataclass(frozen=True, slots=True)
class CurrentReplica:
    """A replica that exists now (starting or running) on a GPU, with its process tree's pids."""

    model: str
    replica: int
    gpu_uuid: str
    pids: frozenset[int] = frozenset()
    asleep: bool = False  # a warm standby in vLLM sleep mode: holds only its standby memory
    budget_mib: int | None = None  # what it was granted, when shrunk below its full budget


@dataclass(frozen=True, slots=True)
class Placement:
    """A replica the plan puts on a GPU."""

    model: str
    replica: int
    gpu_uuid: str
    gpu_index: int
    budget_mib: int
    priority: int
    kept: bool  # already running there: nothing to do
    moved_from: str | None = None  # UUID it is running on now, when the plan moves it
    note: str = ""

    @property
    def key(self) -> tuple[str, int]:
        """Identity of the replica."""
        return (self.model, self.replica)


@dataclass(frozen=True, slots=True)
class Pending:
    """A replica that is wanted but cannot be placed, with the reason in words and numbers."""

    model: str
    replica: int
    budget_mib: int
    priority: int
    reason: str


class StopCause(enum.StrEnum):
    """Why the plan stops a replica that runs now."""

    SCALED_DOWN = "scaled_down"
    REMOVED = "removed"  # the model is no longer in the config
    PREEMPTED = "preempted"  # a higher-priority model needs the memory
    GPU_UNUSABLE = "gpu_unusable"  # lost or drained GPU
    MOVED = "moved"  # stopped here because it starts elsewhere
    NO_ROOM = "no_room"  # it no longer fits where it is and nowhere else


@dataclass(frozen=True, slots=True)
class Stop:
    """A running replica the plan stops."""

    model: str
    replica: int
    gpu_uuid: str
    cause: StopCause
    detail: str


@dataclass(frozen=True, slots=True)
class GpuPlan:
    """How one GPU's memory is spoken for once the plan is carried out."""

    uuid: str
    index: int
    name: str
    health: GpuHealth
    status: str  # "ok", "cordoned", "drained", "degraded: ...", "lost: ..."
    usable_mib: int  # total - reserved (driver + config)
    foreign_mib: int  # held by processes that are not ours, plus memory no process accounts for
    foreign: tuple[GpuProcess, ...]
    committed_mib: int  # sum of the budgets placed here

    @property
    def free_mib(self) -> int:
        """What is left for further placements."""
        return self.usable_mib - self.foreign_mib - self.committed_mib


@dataclass(frozen=True, slots=True)
class Plan:
    """The planner's answer."""

    placements: tuple[Placement, ...]
    pending: tuple[Pending, ...]
    stops: tuple[Stop, ...]
    gpus: tuple[GpuPlan, ...]
    notes: tuple[str, ...] = ()

    def placements_for(self, model: str) -> tuple[Placement, ...]:
        """Placements of one model, by replica."""
        return tuple(p for p in self.placements if p.model == model)
