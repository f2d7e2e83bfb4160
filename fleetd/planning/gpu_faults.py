"""GPU fault policy: debounced health, fault cordons, and failback with hysteresis.

The GPU backends report what they see at each poll; a single NVML timeout or a GPU that
flickers must not move a 16 GiB model. This pure state machine (time comes in as an
argument) turns raw observations into the health the planner acts on, and into decisions:

- **Debounce**: a GPU's health changes for the planner only after the backend has reported
  the new health continuously for ``debounce_s``.
- **Fault cordon**: when a GPU becomes LOST (fell off the bus, a reset- or reboot-class XID,
  NVML cannot reach it), fleetd cordons it itself, so that when it comes back nothing is
  placed there until the failback policy says so. Each such evacuation counts as a move.
- **Failback**: ``manual`` keeps the fault cordon until an operator runs ``fleetctl uncordon``;
  ``auto`` lifts it once the GPU has been healthy for ``failback_after_s`` — unless the GPU
  has already been evacuated ``max_moves`` times within ``moves_window_s``: then it is
  flapping, stays cordoned, and a human is asked to look (one event, one alert).

The planner keeps running replicas where they are, so a failback does not move the primary
model back (that would cost a cold load); it restores capacity: the models evicted during
the fault are placed again on the recovered GPU.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from fleetd.model.gpu import GpuHealth, HostSnapshot

if TYPE_CHECKING:
    from collections.abc import Set as AbstractSet


@dataclass(frozen=True, slots=True)
class FaultPolicy:
    """The knobs (config ``[gpus]``)."""

    debounce_s: float = 2.0
    failback: Literal["manual", "auto"] = "auto"
    failback_after_s: float = 300.0
    max_moves: int = 3
    moves_window_s: float = 3600.0


ChangeKind = Literal["health", "cordon", "uncordon", "flapping"]


@dataclass(frozen=True, slots=True)
class Change:
    """Something the daemon must do or say about one GPU."""

    kind: ChangeKind
    uuid: str
    label: str
    old: GpuHealth
    new: GpuHealth
    reason: str


@dataclass(slots=True)
class _State:
    raw: GpuHealth = GpuHealth.HEALTHY
    raw_reason: str = ""
    raw_since_s: float = 0.0
    effective: GpuHealth = GpuHealth.HEALTHY
    reason: str = ""
    healthy_since_s: float | None = None
    moves: deque[float] = field(default_factory=deque)
    flapping_said: bool = False


class GpuFaults:
    """Per-GPU debounce and failback bookkeeping. ``observe`` once per reconcile pass."""

    def __init__(self, policy: FaultPolicy) -> None:
        self.policy = policy
        self._gpus: dict[str, _State] = {}

    def observe(
        self, host: HostSnapshot, now_s: float, *, fault_cordoned: AbstractSet[str]
    ) -> tuple[HostSnapshot, list[Change]]:
        """The host with debounced health, and what to do about it.

        ``fault_cordoned``: GPUs fleetd cordoned after a fault and has not released yet
        (persisted by the caller, so a restarted fleetd keeps them).
        """
        changes: list[Change] = []
        gpus = []
        for gpu in host.gpus:
            state = self._gpus.get(gpu.uuid)
            if state is None:  # first sight: believe it (a restart must not wait to act)
                state = self._gpus[gpu.uuid] = _State(
                    raw=gpu.health,
                    raw_reason=gpu.health_reason,
                    raw_since_s=now_s,
                    effective=gpu.health,
                    reason=gpu.health_reason,
                    healthy_since_s=now_s if gpu.health is GpuHealth.HEALTHY else None,
                )
                if gpu.health is GpuHealth.LOST and gpu.uuid not in fault_cordoned:
                    changes.append(self._evacuate(state, gpu.uuid, gpu.label, now_s, gpu.health))
            if gpu.health is not state.raw:
                state.raw, state.raw_since_s = gpu.health, now_s
            state.raw_reason = gpu.health_reason
            if state.raw is not state.effective and now_s - state.raw_since_s >= (
                self.policy.debounce_s
            ):
                changes.extend(self._settle(state, gpu.uuid, gpu.label, now_s))
            if state.effective is state.raw:
                state.reason = state.raw_reason
            if gpu.uuid in fault_cordoned:
                changes.extend(self._failback(state, gpu.uuid, gpu.label, now_s))
            gpus.append(
                dataclasses.replace(gpu, health=state.effective, health_reason=state.reason)
            )
        return dataclasses.replace(host, gpus=tuple(gpus)), changes

    def next_check_s(self, now_s: float, fault_cordoned: AbstractSet[str]) -> float | None:
        """Seconds until a debounce or a failback timer may change something (None: never)."""
        waits = []
        for uuid, state in self._gpus.items():
            if state.raw is not state.effective:
                waits.append(self.policy.debounce_s - (now_s - state.raw_since_s))
            if (
                uuid in fault_cordoned
                and self.policy.failback == "auto"
                and state.effective is GpuHealth.HEALTHY
                and state.healthy_since_s is not None
            ):
                waits.append(self.policy.failback_after_s - (now_s - state.healthy_since_s))
        ahead = [w for w in waits if w > 0]  # a passed timer was acted on (or is held)
        return min(ahead) if ahead else None

    def forget_flapping(self, uuid: str) -> None:
        """An operator uncordoned the GPU: start counting moves afresh."""
        state = self._gpus.get(uuid)
        if state is not None:
            state.moves.clear()
            state.flapping_said = False

    def describe(self, uuid: str, now_s: float) -> str:
        """Why a fault-cordoned GPU is still held, for the cordon's reason and explain."""
        state = self._gpus.get(uuid)
        policy = self.policy
        if state is None or state.effective is GpuHealth.LOST:
            return "held after a fault: it is still lost"
        if policy.failback == "manual":
            return "held after a fault (failback = manual): `fleetctl uncordon` when it is fixed"
        if self._flapping(state, now_s):
            return (
                f"held after {len(state.moves)} faults within {policy.moves_window_s:g} s "
                "(flapping): `fleetctl uncordon` when it is fixed"
            )
        since = state.healthy_since_s if state.healthy_since_s is not None else now_s
        left = max(0.0, policy.failback_after_s - (now_s - since))
        return f"held after a fault: failback once healthy for {left:.0f} s more"

    # -- steps ----------------------------------------------------------------------------
    def _settle(self, state: _State, uuid: str, label: str, now_s: float) -> list[Change]:
        old, new = state.effective, state.raw
        state.effective, state.reason = new, state.raw_reason
        text = f"{label} is {new.value}" + (f": {state.raw_reason}" if state.raw_reason else "")
        out = [Change("health", uuid, label, old, new, text)]
        state.healthy_since_s = now_s if new is GpuHealth.HEALTHY else None
        if new is GpuHealth.LOST:
            out.append(self._evacuate(state, uuid, label, now_s, old))
        return out

    def _evacuate(
        self, state: _State, uuid: str, label: str, now_s: float, old: GpuHealth
    ) -> Change:
        state.moves.append(now_s)
        why = state.raw_reason or "lost"
        return Change(
            "cordon",
            uuid,
            label,
            old,
            GpuHealth.LOST,
            f"{label} cordoned by fleetd after a fault ({why}); its workers move elsewhere",
        )

    def _flapping(self, state: _State, now_s: float) -> bool:
        window = self.policy.moves_window_s
        while state.moves and now_s - state.moves[0] > window:
            state.moves.popleft()
        return len(state.moves) >= self.policy.max_moves

    def _failback(self, state: _State, uuid: str, label: str, now_s: float) -> list[Change]:
        policy = self.policy
        if state.effective is GpuHealth.LOST or policy.failback == "manual":
            return []
        if self._flapping(state, now_s):
            if state.flapping_said:
                return []
            state.flapping_said = True
            return [
                Change(
                    "flapping",
                    uuid,
                    label,
                    state.effective,
                    state.effective,
                    f"{label} failed {len(state.moves)} times within "
                    f"{policy.moves_window_s:g} s: it stays cordoned so it cannot thrash the "
                    f"fleet; check it, then `fleetctl uncordon {label}`",
                ),
            ]
        if state.effective is not GpuHealth.HEALTHY or state.healthy_since_s is None:
            return []
        healthy_s = now_s - state.healthy_since_s
        if healthy_s < policy.failback_after_s:
            return []
        return [
            Change(
                "uncordon",
                uuid,
                label,
                state.effective,
                state.effective,
                f"{label} healthy for {healthy_s:.0f} s: failback, placements allowed again",
            )
        ]
