"""The placement planner: which model replica runs on which GPU, and why the rest cannot.

Pure and deterministic: the same inputs always give the same plan, nothing here does I/O or
logs. The algorithm, in order:

1. *Keep* what runs where it may stay (stability): a running replica is not moved without a
   cause (its GPU is lost or drained, it is no longer allowed there, or the memory is gone).
2. *Place* the rest one replica at a time, highest priority first: filter the GPUs a replica
   may use (health, cordon, allowed_gpus, one replica of a model per GPU, total size), then
   pick among those with room the preferred one, then the best fit (the least memory left
   over, so large holes stay free for large models), then the lowest index.
3. *Preempt* when nothing has room: evict strictly lower-priority replicas from the GPU where
   that costs least (lowest priority evicted, fewest evictions, least memory); the evicted go
   back into the queue and may land elsewhere.
4. Whatever is left is *pending*, with a reason that names the numbers.

Budgets are ``vram_gib + overhead_gib`` and are checked against what the GPU really has:
total minus the driver's and the config's reservation, minus memory held by processes that
are not ours (and memory no process accounts for).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fleetd.model.gpu import GpuHealth, GpuProcess, GpuSnapshot, HostSnapshot
from fleetd.model.units import fmt_gib
from fleetd.planning.types import (
    STANDBY_REPLICA,
    CurrentReplica,
    GpuPlan,
    Overrides,
    Pending,
    Placement,
    Plan,
    Stop,
    StopCause,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from fleetd.config import ModelSpec


@dataclass(slots=True)
class _Request:
    spec: ModelSpec
    replica: int
    asleep: bool = False  # a standby that sleeps now: it holds only its standby memory
    granted_mib: int | None = None  # shrunk to fit (partial offload), <= its full budget
    current_gpu: str | None = None
    displaced: str = ""  # why it could not stay where it runs
    displaced_cause: StopCause | None = None
    evicted: str = ""  # who evicted it during this plan

    @property
    def order(self) -> tuple[int, str, int]:
        return (-self.spec.priority, self.spec.name, self.replica)

    @property
    def budget_mib(self) -> int:
        # an asleep standby holds little; awake (loading, or before it first sleeps) it
        # needs its whole budget, so the planner makes room for that while it warms up
        if self.asleep:
            return self.spec.standby_mib
        if self.granted_mib is not None:
            return self.granted_mib
        return self.spec.budget_mib


@dataclass(slots=True)
class _Gpu:
    snap: GpuSnapshot
    usable_mib: int
    foreign_mib: int
    over_budget_mib: int  # our processes' memory beyond the budgets kept here
    foreign: tuple[GpuProcess, ...]
    unattributed_mib: int
    cordoned: bool
    drained: bool
    cordon_reason: str = ""
    avoid: frozenset[tuple[str, int]] = frozenset()  # replicas an operator moved off this GPU
    placed: list[_Request] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.snap.label

    @property
    def free_mib(self) -> int:
        used = sum(r.budget_mib for r in self.placed)
        return self.usable_mib - self.foreign_mib - self.over_budget_mib - used

    def status(self) -> str:
        snap = self.snap
        if snap.health is GpuHealth.LOST:
            return f"lost: {snap.health_reason}" if snap.health_reason else "lost"
        if self.drained:
            return "drained"
        if snap.health is GpuHealth.DEGRADED:
            return f"degraded: {snap.health_reason}" if snap.health_reason else "degraded"
        if self.cordoned:
            return f"cordoned: {self.cordon_reason}" if self.cordon_reason else "cordoned"
        return "ok"

    def why_cannot_keep(self, req: _Request) -> str | None:
        if self.snap.health is GpuHealth.LOST:
            return f"{self.label} is {self.status()}"
        if self.drained:
            return f"{self.label} is drained by an operator"
        if not _allowed(req.spec, self.snap):
            return f"{self.label} is not in allowed_gpus"
        if (req.spec.name, req.replica) in self.avoid:
            return f"{self.label} is drained for this replica by an operator"
        return None

    def why_not_new(self, req: _Request) -> str | None:
        """Why ``req`` may not start here at all, regardless of free memory (None: it may)."""
        status = self.status()
        if status != "ok":
            return f"{self.label} is {status}"
        if not _allowed(req.spec, self.snap):
            return f"{self.label} is not in allowed_gpus"
        if (req.spec.name, req.replica) in self.avoid:
            return f"{self.label} is drained for this replica by an operator"
        if any(p.spec.name == req.spec.name for p in self.placed):
            return f"{self.label} already runs a replica of {req.spec.name}"
        if req.budget_mib > self.usable_mib:
            usable = fmt_gib(self.usable_mib)
            if usable == fmt_gib(req.budget_mib):
                usable = f"{self.usable_mib} MiB (< {req.budget_mib} MiB)"
            return f"{self.label} has only {usable} usable in total"
        return None

    def occupants(self) -> str:
        parts = [f"{p.spec.name} {fmt_gib(p.budget_mib)}" for p in self.placed]
        parts += [
            f"pid {proc.pid} not ours {fmt_gib(proc.used_mib or 0)}"
            for proc in sorted(self.foreign, key=lambda p: p.pid)
        ]
        if self.unattributed_mib > 0:
            parts.append(f"{fmt_gib(self.unattributed_mib)} held outside any listed process")
        if self.over_budget_mib > 0:
            parts.append(f"ours over budget {fmt_gib(self.over_budget_mib)}")
        return ", ".join(parts)


def _allowed(spec: ModelSpec, snap: GpuSnapshot) -> bool:
    if not spec.allowed_gpus:
        return True
    return snap.index in spec.allowed_gpus or snap.uuid in spec.allowed_gpus


def _preference_rank(spec: ModelSpec, snap: GpuSnapshot) -> int:
    for rank, ref in enumerate(spec.preferred_gpus):
        if ref in (snap.index, snap.uuid):
            return rank
    return len(spec.preferred_gpus)


def _build_gpus(
    host: HostSnapshot,
    overrides: Overrides,
    current: Sequence[CurrentReplica],
    budgets: Mapping[str, int],
    reserved_mib: Mapping[str, int],
    releasing_pids: frozenset[int],
) -> list[_Gpu]:
    our_pids = frozenset().union(*(c.pids for c in current)) - releasing_pids
    gpus = []
    for snap in sorted(host.gpus, key=lambda g: g.index):
        ours_actual = sum(p.used_mib or 0 for p in snap.processes if p.pid in our_pids)
        releasing = sum(p.used_mib or 0 for p in snap.processes if p.pid in releasing_pids)
        foreign = tuple(
            p for p in snap.processes if p.pid not in our_pids and p.pid not in releasing_pids
        )
        listed = sum(p.used_mib or 0 for p in snap.processes)
        kept_budgets = sum(budgets.get(c.model, 0) for c in current if c.gpu_uuid == snap.uuid)
        gpus.append(
            _Gpu(
                snap=snap,
                usable_mib=max(0, snap.usable_mib - reserved_mib.get(snap.uuid, 0)),
                foreign_mib=max(0, snap.used_mib - ours_actual - releasing),
                over_budget_mib=max(0, ours_actual - kept_budgets),
                foreign=foreign,
                unattributed_mib=max(0, snap.used_mib - listed),  # counted in foreign_mib
                cordoned=snap.uuid in overrides.cordoned,
                cordon_reason=overrides.cordon_reasons.get(snap.uuid, ""),
                drained=snap.uuid in overrides.drained,
                avoid=frozenset((m, r) for m, r, g in overrides.avoid if g == snap.uuid),
            )
        )
    return gpus


def plan(
    models: Sequence[ModelSpec],
    host: HostSnapshot,
    *,
    overrides: Overrides | None = None,
    current: Sequence[CurrentReplica] = (),
    reserved_mib: Mapping[str, int] | None = None,
    releasing_pids: frozenset[int] = frozenset(),
) -> Plan:
    """Place every wanted replica of ``models`` on ``host``'s GPUs.

    ``current`` lists the replicas that exist now (for stability and to tell our processes
    from foreign ones); ``reserved_mib`` maps GPU UUIDs to memory the config keeps back;
    ``releasing_pids`` are our processes being stopped: their memory counts as free (the
    workers that need it wait for it before they start).
    """
    overrides = overrides or Overrides()
    budgets = {m.name: m.budget_mib for m in models}
    gpus = _build_gpus(host, overrides, current, budgets, reserved_mib or {}, releasing_pids)
    asleep = {(c.model, c.replica) for c in current if c.asleep}
    requests = sorted(
        [
            *(
                _Request(spec, i)
                for spec in models
                for i in range(overrides.wanted(spec.name, spec.replicas))
            ),
            *(
                _Request(spec, STANDBY_REPLICA, asleep=(spec.name, STANDBY_REPLICA) in asleep)
                for spec in models
                if spec.standby and overrides.wanted(spec.name, spec.replicas) > 0
            ),
        ],
        key=lambda r: r.order,
    )
    queue = _keep_running(requests, gpus, current)
    unplaced = _place_queue(queue, gpus)
    # reasons describe the final plan, so they name what ends up holding each GPU
    pending = [_pending(req, gpus) for req in unplaced]
    placements = _placements(gpus)
    stops = _unwanted_stops(models, overrides, current) + _displaced_stops(requests, placements)
    return Plan(
        placements=placements,
        pending=tuple(sorted(pending, key=lambda p: (-p.priority, p.model, p.replica))),
        stops=tuple(sorted(stops, key=lambda s: (s.model, s.replica))),
        gpus=tuple(_gpu_plan(g) for g in gpus),
    )


_Queue = list[tuple[tuple[int, str, int], _Request]]


def _keep_running(
    requests: Sequence[_Request], gpus: Sequence[_Gpu], current: Sequence[CurrentReplica]
) -> _Queue:
    """Step 1: keep running replicas where they may stay; queue the rest (a heap)."""
    gpu_by_uuid = {g.snap.uuid: g for g in gpus}
    current_by_key = {(c.model, c.replica): c for c in current}
    queue: _Queue = []
    for req in requests:
        cur = current_by_key.get((req.spec.name, req.replica))
        if cur is not None:
            req.current_gpu = cur.gpu_uuid
            gpu = gpu_by_uuid.get(cur.gpu_uuid)
            why = (
                f"its GPU {cur.gpu_uuid} is no longer present"
                if gpu is None
                else gpu.why_cannot_keep(req)
            )
            req.displaced_cause = StopCause.GPU_UNUSABLE
            if gpu is not None and why is None:
                if gpu.free_mib >= req.budget_mib:
                    gpu.placed.append(req)
                    continue
                least = req.spec.min_budget_mib
                if least is not None and gpu.free_mib >= least:  # stay, shrunk
                    before = cur.budget_mib
                    # keep what it was granted when that still fits: taking more would
                    # displace the lower priorities that were placed beside it
                    keep = before is not None and least <= before <= gpu.free_mib
                    req.granted_mib = before if keep else gpu.free_mib
                    gpu.placed.append(req)
                    continue
                why = f"it no longer fits on {gpu.label} ({gpu.occupants()})"
                req.displaced_cause = StopCause.NO_ROOM
            req.displaced = why or ""
        heapq.heappush(queue, (req.order, req))
    return queue


def _place_queue(queue: _Queue, gpus: Sequence[_Gpu]) -> list[_Request]:
    """Steps 2-3: place by priority, preempting strictly lower priorities; return the rest."""
    unplaced: list[_Request] = []
    while queue:
        _, req = heapq.heappop(queue)
        target = _best_fit(req, gpus)
        if target is None:
            found = _preempt(req, gpus)
            if found is not None:
                target, victims = found
                for victim in victims:
                    target.placed.remove(victim)
                    victim.granted_mib = None
                    victim.evicted = (
                        f"evicted from {target.label} by {req.spec.name} "
                        f"(priority {req.spec.priority} > {victim.spec.priority})"
                    )
                    heapq.heappush(queue, (victim.order, victim))
            else:
                target = _shrink(req, gpus)
        if target is not None:
            target.placed.append(req)
        else:
            unplaced.append(req)
    return unplaced


def _unwanted_stops(
    models: Sequence[ModelSpec], overrides: Overrides, current: Sequence[CurrentReplica]
) -> list[Stop]:
    """Running replicas nobody wants any more: model removed or scaled down."""
    by_name = {m.name: m for m in models}
    stops = []
    for cur in current:
        spec = by_name.get(cur.model)
        if spec is None:
            stops.append(
                Stop(cur.model, cur.replica, cur.gpu_uuid, StopCause.REMOVED, "not in the config")
            )
        elif cur.replica == STANDBY_REPLICA:
            if not spec.standby or overrides.wanted(cur.model, spec.replicas) == 0:
                detail = "no standby wanted" if not spec.standby else "drained by an operator"
                stops.append(
                    Stop(cur.model, cur.replica, cur.gpu_uuid, StopCause.SCALED_DOWN, detail)
                )
        elif cur.replica >= (wanted := overrides.wanted(cur.model, spec.replicas)):
            detail = (
                "drained by an operator"
                if cur.model in overrides.drained_models
                else f"scaled to {wanted} replica{'s' if wanted != 1 else ''}"
            )
            stops.append(Stop(cur.model, cur.replica, cur.gpu_uuid, StopCause.SCALED_DOWN, detail))
    return stops


def _displaced_stops(requests: Sequence[_Request], placements: Sequence[Placement]) -> list[Stop]:
    """Wanted replicas that run now but not where the plan puts them (or nowhere)."""
    placed = {p.key: p for p in placements}
    stops = []
    for req in requests:
        now = placed.get((req.spec.name, req.replica))
        if req.current_gpu is None or (now is not None and now.gpu_uuid == req.current_gpu):
            continue
        history = req.evicted or req.displaced
        if now is not None:
            cause = StopCause.MOVED
            detail = f"moves to gpu{now.gpu_index}" + (f" because {history}" if history else "")
        elif req.evicted:
            cause, detail = StopCause.PREEMPTED, req.evicted
        else:
            cause, detail = req.displaced_cause or StopCause.NO_ROOM, req.displaced
        stops.append(Stop(req.spec.name, req.replica, req.current_gpu, cause, detail))
    return stops


def _best_fit(req: _Request, gpus: Sequence[_Gpu]) -> _Gpu | None:
    fits = [g for g in gpus if g.why_not_new(req) is None and g.free_mib >= req.budget_mib]
    if not fits:
        return None
    return min(
        fits,
        key=lambda g: (
            _preference_rank(req.spec, g.snap),
            g.free_mib - req.budget_mib,
            g.snap.index,
        ),
    )


def _shrink(req: _Request, gpus: Sequence[_Gpu]) -> _Gpu | None:
    """Partial offload as a last resort: the GPU with the most room, if it has min_vram.

    Tried only when the full budget fits nowhere, even by evicting lower priorities; the
    request keeps what the GPU has left (up to its full budget). Its current GPU wins ties,
    so a shrunk replica stays where it runs.
    """
    least = req.spec.min_budget_mib
    if least is None:
        return None
    fits = [g for g in gpus if g.why_not_new(req) is None and g.free_mib >= least]
    if not fits:
        return None
    best = min(
        fits,
        key=lambda g: (
            g.snap.uuid != req.current_gpu,
            _preference_rank(req.spec, g.snap),
            -g.free_mib,
            g.snap.index,
        ),
    )
    req.granted_mib = min(req.spec.budget_mib, best.free_mib)
    return best


def _preempt(req: _Request, gpus: Sequence[_Gpu]) -> tuple[_Gpu, list[_Request]] | None:
    """The cheapest set of strictly lower-priority replicas whose eviction makes room."""
    best: tuple[tuple[int, int, int, int, int], _Gpu, list[_Request]] | None = None
    for gpu in gpus:
        if gpu.why_not_new(req) is not None:
            continue
        lower = sorted(
            (p for p in gpu.placed if p.spec.priority < req.spec.priority),
            key=lambda p: (p.spec.priority, -p.budget_mib, p.spec.name, -p.replica),
        )
        free = gpu.free_mib
        victims: list[_Request] = []
        for cand in lower:
            if free >= req.budget_mib:
                break
            victims.append(cand)
            free += cand.budget_mib
        if free < req.budget_mib:
            continue
        # give back victims that turned out not to be needed (latest-chosen first)
        for cand in reversed(victims[:]):
            if free - cand.budget_mib >= req.budget_mib:
                victims.remove(cand)
                free -= cand.budget_mib
        cost = (
            max(v.spec.priority for v in victims),
            len(victims),
            sum(v.budget_mib for v in victims),
            _preference_rank(req.spec, gpu.snap),
            gpu.snap.index,
        )
        if best is None or cost < best[0]:
            best = (cost, gpu, victims)
    return None if best is None else (best[1], best[2])


def _pending(req: _Request, gpus: Sequence[_Gpu]) -> Pending:
    spec = req.spec
    parts: list[str] = []
    if not gpus:
        parts.append("no GPUs were found")
    need = fmt_gib(req.budget_mib)
    exact = False  # when rounding makes "needs 2.8" and "has 2.8 free" look alike, use MiB
    for gpu in gpus:
        why = gpu.why_not_new(req)
        free = fmt_gib(gpu.free_mib)
        if why is None and free == need:
            exact, free = True, f"{gpu.free_mib} MiB"
        if why is None:
            why = f"{gpu.label} has {free} free ({gpu.occupants()})"
            evictable = sum(p.budget_mib for p in gpu.placed if p.spec.priority < spec.priority)
            if evictable:
                why += f", {fmt_gib(gpu.free_mib + evictable)} even after evicting lower priorities"
        parts.append(why)
    if exact:
        need = f"{req.budget_mib} MiB"
    if spec.min_budget_mib is not None:
        need += f" (at least {fmt_gib(spec.min_budget_mib)} partially offloaded)"
    reason = f"{spec.name} needs {need}; " + "; ".join(parts)
    if spec.allowed_gpus and not any(_allowed(spec, g.snap) for g in gpus):
        refs = ", ".join(str(r) for r in spec.allowed_gpus)
        reason += f"; none of allowed_gpus ({refs}) exists on this host"
    history = req.evicted or req.displaced
    if history:
        reason = f"{history}; {reason}"
    return Pending(spec.name, req.replica, req.budget_mib, spec.priority, reason)


def _placements(gpus: Sequence[_Gpu]) -> tuple[Placement, ...]:
    out: list[Placement] = []
    for gpu in gpus:
        for req in gpu.placed:
            spec = req.spec
            note = ""
            if req.replica == STANDBY_REPLICA:
                note = (
                    f"warm standby: {fmt_gib(spec.standby_mib)} asleep"
                    if req.asleep
                    else f"warm standby: loads with {fmt_gib(spec.budget_mib)}, then sleeps "
                    f"with {fmt_gib(spec.standby_mib)}"
                )
            elif req.granted_mib is not None and req.granted_mib < spec.budget_mib:
                note = (
                    f"shrunk to fit: {fmt_gib(req.granted_mib)} of {fmt_gib(spec.budget_mib)} "
                    "in VRAM, the rest of its layers in system RAM (slower)"
                )
            elif spec.offloaded_mib:
                note = (
                    f"partial offload: {fmt_gib(req.budget_mib)} in VRAM, "
                    f"{fmt_gib(spec.offloaded_mib)} in system RAM"
                )
            moved_from = req.current_gpu if req.current_gpu not in (None, gpu.snap.uuid) else None
            out.append(
                Placement(
                    model=spec.name,
                    replica=req.replica,
                    gpu_uuid=gpu.snap.uuid,
                    gpu_index=gpu.snap.index,
                    budget_mib=req.budget_mib,
                    priority=spec.priority,
                    kept=req.current_gpu == gpu.snap.uuid,
                    moved_from=moved_from,
                    note=note,
                )
            )
    return tuple(sorted(out, key=lambda p: (-p.priority, p.model, p.replica)))


def _gpu_plan(gpu: _Gpu) -> GpuPlan:
    return GpuPlan(
        uuid=gpu.snap.uuid,
        index=gpu.snap.index,
        name=gpu.snap.name,
        health=gpu.snap.health,
        status=gpu.status(),
        usable_mib=gpu.usable_mib,
        foreign_mib=gpu.foreign_mib + gpu.over_budget_mib,
        foreign=gpu.foreign,
        committed_mib=sum(r.budget_mib for r in gpu.placed),
    )
