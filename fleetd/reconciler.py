"""The reconcile loop: observe the GPUs, plan, and make the workers match the plan.

Each pass takes a GPU snapshot, describes what runs now (``CurrentReplica``s with their
process trees, so our memory is told from foreign memory), asks the pure planner for the
plan, then acts: stop what the plan stops, ensure what it places. Acting means *asking*
workers (``ensure_running`` / ``ensure_stopped``); each worker's owner task does the work,
so a long drain or load never blocks the loop. Passes run when something changed (a worker
changed state, a GPU event, an operator command) and on a periodic resync.

The reconciler is the only caller of ``fleetd.planning``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import psutil
import structlog

from fleetd.config import Engine, FleetConfig, ModelSpec
from fleetd.engines import ollama as ollama_adapter
from fleetd.engines import vllm as vllm_adapter
from fleetd.gateway.inflight import Inflight, target_id
from fleetd.gateway.routing import Replica
from fleetd.model.gpu import GpuHealth
from fleetd.model.worker import RUNNING_STATES, StopReason, WorkerState, WorkerStatus
from fleetd.ollama_slot import OllamaSlot
from fleetd.planning import placement
from fleetd.planning.gpu_faults import Change, FaultPolicy, GpuFaults
from fleetd.planning.types import STANDBY_REPLICA, CurrentReplica, Overrides, Plan, StopCause
from fleetd.runtime.health import HttpProbe, ProbeResult
from fleetd.state import WorkerRecord, WorkerRecords, safe_key
from fleetd.supervisor import GpuGate, ProcessWorker, WorkerSpec

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path

    from fleetd.model.gpu import GpuSnapshot, HostSnapshot
    from fleetd.obs.events import EventBus, Subscription
    from fleetd.runtime.clock import Clock
    from fleetd.runtime.gpu import GpuBackend
    from fleetd.runtime.launcher import Launcher, ProcessHandle

_log = structlog.get_logger("fleetd.reconciler")

_STOP_REASONS = {
    StopCause.SCALED_DOWN: StopReason.DESIRED_REMOVED,
    StopCause.REMOVED: StopReason.DESIRED_REMOVED,
    StopCause.PREEMPTED: StopReason.PREEMPTED,
    StopCause.GPU_UNUSABLE: StopReason.GPU_UNUSABLE,
    StopCause.MOVED: StopReason.MOVED,
    StopCause.NO_ROOM: StopReason.PREEMPTED,
}

ReplicaKey = tuple[str, int, str]  # (model, replica, gpu uuid)


class VllmChecks:
    """Readiness and liveness of one ``vllm serve``."""

    def __init__(
        self,
        probe: HttpProbe,
        base_url: str,
        served: str,
        *,
        timeout_s: float,
        gateway_busy: Callable[[], int] = lambda: 0,
    ) -> None:
        self._probe = probe
        self._base = base_url
        self._served = served
        self._timeout_s = timeout_s
        self._gateway_busy = gateway_busy

    async def ready(self) -> ProbeResult:
        """/health 200 and the served name in /v1/models."""
        health = await self._probe.get(
            vllm_adapter.health_url(self._base), timeout_s=self._timeout_s
        )
        if not health.ok:
            return health
        models = await self._probe.get(
            vllm_adapter.models_url(self._base), timeout_s=self._timeout_s, want_json=True
        )
        if models.ok and not vllm_adapter.serves(models.body, self._served):
            return ProbeResult(ok=False, detail=f"{self._served!r} not in /v1/models")
        return models

    async def alive(self) -> ProbeResult:
        """/health 200."""
        return await self._probe.get(vllm_adapter.health_url(self._base), timeout_s=self._timeout_s)

    async def sleep(self) -> ProbeResult:
        """POST /sleep?level=1 (warm standby)."""
        return await self._probe.post_json(
            vllm_adapter.sleep_url(self._base), {}, timeout_s=max(60.0, self._timeout_s)
        )

    async def wake_up(self, *, timeout_s: float) -> ProbeResult:
        """POST /wake_up, then /is_sleeping must say false."""
        woke = await self._probe.post_json(
            vllm_adapter.wake_up_url(self._base), {}, timeout_s=timeout_s
        )
        if not woke.ok:
            return woke
        check = await self._probe.get(
            vllm_adapter.is_sleeping_url(self._base), timeout_s=self._timeout_s, want_json=True
        )
        if check.ok and isinstance(check.body, dict) and check.body.get("is_sleeping") is False:
            return check
        return ProbeResult(ok=False, detail=f"still asleep after /wake_up ({check.detail})")

    async def idle(self) -> bool | None:
        """No request in flight through the gateway, and vllm:num_requests_running == 0.

        None when /metrics does not say (then the gateway's count alone decides).
        """
        if self._gateway_busy():
            return False
        url = vllm_adapter.metrics_url(self._base)
        text = await self._probe.get_text(url, timeout_s=self._timeout_s)
        if text is None:
            return None
        running = vllm_adapter.running_requests(text)
        return None if running is None else running == 0


class OllamaChecks:
    """Readiness and liveness of one ``ollama serve``."""

    def __init__(self, probe: HttpProbe, base_url: str, *, timeout_s: float) -> None:
        self._probe = probe
        self._url = ollama_adapter.health_url(base_url)
        self._timeout_s = timeout_s

    async def ready(self) -> ProbeResult:
        """GET / answers 200."""
        return await self._probe.get(self._url, timeout_s=self._timeout_s)

    async def alive(self) -> ProbeResult:
        """GET / answers 200."""
        return await self._probe.get(self._url, timeout_s=self._timeout_s)

    async def idle(self) -> bool | None:
        """Ollama drains its own models on unload; the server itself has nothing to wait for."""
        return True


@dataclass
class Paths:
    """Where workers' logs and records go."""

    log_dir: Path
    records: WorkerRecords


@dataclass
class _Ollama:
    serve: ProcessWorker
    slots: dict[ReplicaKey, OllamaSlot] = field(default_factory=dict)


class Reconciler:
    """Owns every worker and slot and their tasks; makes them match the plan."""

    def __init__(  # noqa: PLR0913 - the composition root passes each boundary by name
        self,
        cfg: FleetConfig,
        *,
        backend: GpuBackend,
        launcher: Launcher,
        probe: HttpProbe,
        clock: Clock,
        bus: EventBus,
        paths: Paths,
        engine_env: Mapping[str, str],
        overrides: Overrides | None = None,
        inflight: Inflight | None = None,
    ) -> None:
        self.cfg = cfg
        self.overrides = overrides or Overrides()
        self.inflight = inflight or Inflight()  # the gateway's counts: drains wait for them
        self._backend = backend
        self._launcher = launcher
        self._probe = probe
        self._clock = clock
        self._bus = bus
        self._paths = paths
        self._engine_env = dict(engine_env)
        self._vllm: dict[ReplicaKey, ProcessWorker] = {}
        self._ollama: dict[str, _Ollama] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._gates: dict[str, GpuGate] = {}
        self._kick = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._over_budget: set[str] = set()
        self.drain_timeouts: dict[str, float] = {}  # model name or GPU UUID -> drain bound
        self.vram_mib: dict[str, int] = {}  # worker name -> measured VRAM (last pass)
        self.host: HostSnapshot | None = None
        self.raw_health: dict[str, GpuHealth] = {}  # as the backend said at the last pass
        self.plan: Plan | None = None
        self.on_pass: Callable[[float, bool], None] | None = None  # (seconds, ok): metrics
        self.passes = 0
        self.last_pass_s: float | None = None  # loop time of the last completed pass
        self.passed = asyncio.Condition()
        self.faults = GpuFaults(fault_policy(cfg))
        self.on_gpu_changes: Callable[[list[Change]], None] | None = None  # Control persists
        # (model, replica, GPU UUID) -> loop time until which a crash-looping replica avoids it
        self.crash_avoid: dict[tuple[str, int, str], float] = {}
        self._xid_restarts: dict[str, float] = {}  # GPU UUID -> loop time of the last one
        self._recheck: asyncio.TimerHandle | None = None

    # -- public ---------------------------------------------------------------------------
    def kick(self) -> None:
        """Ask for a reconcile pass soon (cheap; passes coalesce)."""
        self._kick.set()

    def workers(self) -> list[WorkerStatus]:
        """Every worker and Ollama model slot, for status displays and the gateway."""
        out = [w.status() for w in self._vllm.values()]
        for group in self._ollama.values():
            out.append(group.serve.status())
            out.extend(slot.status() for slot in group.slots.values())
        return sorted(out, key=lambda s: (s.gpu_index, s.name))

    def replicas(self, inflight: Inflight) -> list[Replica]:
        """Every ready vLLM worker and loaded Ollama model, for the gateway's routing."""
        out: list[Replica] = []

        def add(
            target: str, name: str, model: str, engine: Engine, url: str, upstream: str
        ) -> None:
            out.append(Replica(target, name, model, engine, url, upstream, inflight.count(target)))

        for (model, _replica, gpu), worker in self._vllm.items():
            if worker.state is not WorkerState.READY or worker.standby:
                continue
            spec = self.cfg.model_named(model)
            if spec is not None:
                url = f"http://127.0.0.1:{worker.spec.port}"
                add(target_id(worker.name, gpu), worker.name, model, Engine.VLLM, url, spec.served)
        for group in self._ollama.values():
            if group.serve.state is not WorkerState.READY:
                continue
            for slot in group.slots.values():
                if slot.state is WorkerState.READY:
                    tag = ollama_adapter.normalise(slot.spec.model)
                    add(slot.target, slot.name, slot.spec.name, Engine.OLLAMA, slot.base_url, tag)
        return out

    def find(self, name: str) -> ProcessWorker | OllamaSlot | None:
        """The wanted worker or model slot with this display name (else any with it)."""
        owners: list[ProcessWorker | OllamaSlot] = [*self._vllm.values()]
        for group in self._ollama.values():
            owners.append(group.serve)
            owners.extend(group.slots.values())
        named = [o for o in owners if o.name == name]
        return next((o for o in named if o.wanted), named[0] if named else None)

    def replica_of(self, owner: ProcessWorker | OllamaSlot) -> tuple[str, int, str] | None:
        """(model, replica, GPU UUID) of a vLLM worker or an Ollama slot; None for servers."""
        for key, worker in self._vllm.items():
            if worker is owner:
                return key
        for group in self._ollama.values():
            for key, slot in group.slots.items():
                if slot is owner:
                    return key
        return None

    def our_pids(self) -> dict[int, str]:
        """Every pid of our engines' process trees, with the worker it belongs to."""
        owners: dict[int, str] = {}
        for worker in self._vllm.values():
            for pid in _tree(worker.handle):
                owners[pid] = worker.name
        for group in self._ollama.values():
            for pid in _tree(group.serve.handle):
                owners[pid] = group.serve.name
        return owners

    def set_config(self, cfg: FleetConfig) -> list[str]:
        """Adopt a new (validated) config; workers whose spec changed restart. Returns them."""
        old = {m.name: m for m in self.cfg.models}
        self.cfg = cfg
        self.faults.policy = fault_policy(cfg)
        changed = []
        for (model, _replica, _gpu), worker in self._vllm.items():
            spec = cfg.model_named(model)
            if worker.wanted and spec is not None and spec != old.get(model):
                worker.ensure_stopped(StopReason.RESPEC)
                changed.append(worker.name)
        for group in self._ollama.values():
            for (model, _replica, _gpu), slot in group.slots.items():
                spec = cfg.model_named(model)
                if slot.wanted and spec is not None and spec != old.get(model):
                    slot.ensure_stopped()
                    changed.append(slot.name)
        self.kick()
        return changed

    async def wait_passes(self, count: int = 1, *, timeout_s: float = 30.0) -> None:
        """Wait until ``count`` more passes have completed (for tests and `--wait`)."""
        target = self.passes + count
        async with asyncio.timeout(timeout_s), self.passed:
            await self.passed.wait_for(lambda: self.passes >= target)

    async def run(self) -> None:
        """The reconciler task: adopt what runs, then reconcile on every kick and resync."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            await self._adopt()
            watcher = self._bus.subscribe()
            tg.create_task(self._follow_events(watcher), name="reconciler-events")
            loop = asyncio.get_running_loop()
            while True:
                started = loop.time()
                ok = True
                try:
                    await self.reconcile_once()
                except Exception as exc:  # noqa: BLE001 - a loop boundary: log, count, go on
                    ok = False
                    self._bus.emit(
                        "reconcile.error", f"reconcile pass failed: {type(exc).__name__}: {exc}"
                    )
                if self.on_pass is not None:
                    self.on_pass(loop.time() - started, ok)
                self._kick.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.cfg.daemon.resync_interval_s):
                        await self._kick.wait()
                await asyncio.sleep(0.02)  # coalesce a burst of kicks into one pass

    async def _follow_events(self, sub: Subscription) -> None:
        async for event in sub:
            if event.kind.startswith(("worker.", "gpu.")) and event.kind != "worker.over_budget":
                self._kick.set()

    async def reconcile_once(self) -> Plan:
        """One pass: observe (health debounced by the fault policy), plan, act."""
        raw = await self._backend.snapshot()
        self.raw_health = {g.uuid: g.health for g in raw.gpus}
        loop = asyncio.get_running_loop()
        now = loop.time()
        host, changes = self.faults.observe(raw, now, fault_cordoned=self.overrides.fault_cordoned)
        if changes and self.on_gpu_changes is not None:
            self.on_gpu_changes(changes)  # may cordon or uncordon: self.overrides changes
        self.host = host
        self._failover_crash_loops(now)
        self._promote_standbys(host)
        self._schedule_recheck(now)
        current, releasing = self._current()
        plan = placement.plan(
            self.cfg.models,
            host,
            overrides=self._effective_overrides(now),
            current=current,
            reserved_mib=self._reserved(host),
            releasing_pids=releasing,
        )
        self.plan = plan
        for stop in plan.stops:
            self._stop(stop.model, stop.replica, stop.gpu_uuid, _STOP_REASONS[stop.cause])
        for place in plan.placements:
            gpu = host.by_uuid(place.gpu_uuid)
            spec = self.cfg.model_named(place.model)
            if gpu is not None and spec is not None:
                self._ensure(spec, place.replica, gpu, budget_mib=place.budget_mib)
        self._collect_garbage()
        self._check_budgets(host)
        self.passes += 1
        self.last_pass_s = asyncio.get_running_loop().time()
        async with self.passed:
            self.passed.notify_all()
        return plan

    def restart_on_gpu(self, uuid: str, why: str) -> list[str]:
        """An application-level XID: restart our engines on that GPU (once per holdoff)."""
        now = asyncio.get_running_loop().time()
        last = self._xid_restarts.get(uuid)
        if last is not None and now - last < self.cfg.gpus.xid_restart_holdoff_s:
            return []
        self._xid_restarts[uuid] = now
        names = []
        workers = [w for (_m, _r, gpu), w in self._vllm.items() if gpu == uuid]
        workers += [g.serve for gpu, g in self._ollama.items() if gpu == uuid]
        for worker in workers:
            if worker.wanted and worker.pid is not None:
                worker.restart()
                names.append(worker.name)
        if names:
            self._bus.emit(
                "gpu.xid_error",
                f"{why}: restarting {', '.join(names)} on that GPU",
                gpu_uuid=uuid,
                workers=names,
            )
        return names

    def _effective_overrides(self, now: float) -> Overrides:
        """The operator's overrides plus fleetd's own: crash-loop avoids, cordon reasons."""
        ov = self.overrides
        avoid = ov.avoid | set(self.crash_avoid)  # expired ones went in _failover_crash_loops
        reasons = {uuid: self.faults.describe(uuid, now) for uuid in ov.fault_cordoned}
        return dataclasses.replace(ov, avoid=avoid, cordon_reasons=reasons)

    def _failover_crash_loops(self, now: float) -> None:
        """A replica that crash-loops on a GPU moves: the GPU may be the problem."""
        hold_s = self.cfg.gpus.failback_after_s
        for key in [k for k, until in self.crash_avoid.items() if until <= now]:
            del self.crash_avoid[key]
        for key, worker in self._vllm.items():
            if worker.state is not WorkerState.FAILED or not worker.wanted:
                continue
            if key in self.crash_avoid:
                continue
            model, _replica, gpu = key
            others = [g for g in (self.host.gpus if self.host else ()) if g.uuid != gpu]
            if not others:
                continue
            self.crash_avoid[key] = now + max(hold_s, 60.0)
            label = worker.spec.gpu_index
            self._bus.emit(
                "worker.failover",
                f"{worker.name} crash-looped on gpu{label} ({worker.reason}); placing "
                f"{model} on another GPU for {max(hold_s, 60.0):.0f} s",
                worker=worker.name,
                model=model,
                gpu=label,
            )

    def _promote_standbys(self, host: HostSnapshot) -> None:
        """Failover to a warm standby: it becomes the replica whose GPU or engine is gone.

        The planner then keeps it where it is with its full budget, evicting lower
        priorities there; the worker wakes once their memory is free.
        """
        drained = self.overrides.drained
        usable = {
            g.uuid for g in host.gpus if g.health is GpuHealth.HEALTHY and g.uuid not in drained
        }
        # a degraded GPU keeps what runs: only a lost or drained one gives a replica up
        alive = {
            g.uuid for g in host.gpus if g.health is not GpuHealth.LOST and g.uuid not in drained
        }
        for (model, replica, gpu), standby in list(self._vllm.items()):
            if replica != STANDBY_REPLICA or standby.state is not WorkerState.STANDBY:
                continue
            if not standby.wanted or gpu not in usable:
                continue
            spec = self.cfg.model_named(model)
            if spec is None:
                continue
            lost = self._lost_replica(spec, alive)
            if lost is None:
                continue
            name = spec.name if spec.replicas <= 1 and lost == 0 else f"{spec.name}#{lost}"
            old = next(
                (k for k in self._vllm if k[0] == model and k[1] == lost and k[2] != gpu), None
            )
            if old is not None:  # the dead one goes; its key is needed for no one
                dead = self._vllm.pop(old)
                dead.ensure_stopped(StopReason.GPU_UNUSABLE, drain=False)
                self._vllm[(model, -1 - lost, old[2])] = dead
            del self._vllm[(model, replica, gpu)]
            self._vllm[(model, lost, gpu)] = standby
            standby.promote(name)
            self._rekey_record(standby, model, lost)
            self._bus.emit(
                "worker.promoted",
                f"failover: the warm standby of {model} on gpu{standby.spec.gpu_index} "
                f"becomes {name}; it wakes once gpu{standby.spec.gpu_index} has room",
                worker=name,
                model=model,
                gpu=standby.spec.gpu_index,
            )

    def _lost_replica(self, spec: ModelSpec, usable: set[str]) -> int | None:
        """A wanted replica of ``spec`` with no serving worker on a usable GPU, if any."""
        wanted = self.overrides.wanted(spec.name, spec.replicas)
        for replica in range(wanted):
            here = [
                (gpu, w) for (m, r, gpu), w in self._vllm.items() if m == spec.name and r == replica
            ]
            healthy = [
                w
                for gpu, w in here
                if gpu in usable
                and w.wanted
                and w.state is not WorkerState.FAILED
                and (spec.name, replica, gpu) not in self.crash_avoid
            ]
            if not healthy:
                return replica
        return None

    def _rekey_record(self, worker: ProcessWorker, model: str, replica: int) -> None:
        """The state dir must say what the worker is now, for the next fleetd's adoption."""
        records = self._paths.records
        handle = worker.handle
        if worker.record_key:
            records.remove(worker.record_key)
        key = safe_key(f"vllm-{model}-{replica}-{worker.spec.gpu_uuid}")
        worker.record_key = key
        worker.record_replica = replica
        if handle is not None:
            records.save(_record(worker, handle, model))

    def _schedule_recheck(self, now: float) -> None:
        """A pass when a debounce or failback timer may have run out (not just at resync)."""
        delay = self.faults.next_check_s(now, self.overrides.fault_cordoned)
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        if delay is not None:
            self._recheck = asyncio.get_running_loop().call_later(delay + 0.01, self.kick)

    async def shutdown(self, *, leave_running: bool) -> None:
        """After the run task was cancelled: stop every engine (or leave them for adoption)."""
        vllm = list(self._vllm.values())
        serves = [g.serve for g in self._ollama.values()]
        # vLLM workers first, in parallel; Ollama servers (and their models) after
        await asyncio.gather(*(w.shutdown(leave_running=leave_running) for w in vllm))
        await asyncio.gather(*(s.shutdown(leave_running=leave_running) for s in serves))

    # -- observing ------------------------------------------------------------------------
    def _current(self) -> tuple[list[CurrentReplica], frozenset[int]]:
        current: list[CurrentReplica] = []
        releasing: set[int] = set()
        for (model, replica, gpu), worker in self._vllm.items():
            pids = _tree(worker.handle)
            if worker.wanted:
                asleep = worker.state is WorkerState.STANDBY
                current.append(CurrentReplica(model, replica, gpu, pids, asleep=asleep))
            else:
                releasing |= pids
        for gpu, group in self._ollama.items():
            pids = _tree(group.serve.handle)
            wanted = [(k, s) for k, s in group.slots.items() if s.wanted]
            for (model, replica, _), slot in wanted:
                current.append(
                    CurrentReplica(model, replica, gpu, pids, budget_mib=slot.budget_mib)
                )
            if not wanted:
                releasing |= pids
        return current, frozenset(releasing)

    def _reserved(self, host: HostSnapshot) -> dict[str, int]:
        out: dict[str, int] = {}
        for dev in self.cfg.gpus.device:
            for gpu in host.gpus:
                if dev.gpu in (gpu.index, gpu.uuid):
                    out[gpu.uuid] = dev.reserved_mib
        return out

    def _check_budgets(self, host: HostSnapshot) -> None:
        """An event when a worker's processes hold more VRAM than its budget (edge-triggered)."""
        for worker in self._vllm.values():
            gpu = host.by_uuid(worker.spec.gpu_uuid)
            pids = _tree(worker.handle)
            if gpu is None or not pids:
                continue
            used = sum(p.used_mib or 0 for p in gpu.processes if p.pid in pids)
            self.vram_mib[worker.name] = used
            over = used > worker.spec.budget_mib
            if over and worker.name not in self._over_budget:
                self._bus.emit(
                    "worker.over_budget",
                    f"{worker.name}: holds {used} MiB on gpu{gpu.index}, budget "
                    f"{worker.spec.budget_mib} MiB",
                    worker=worker.name,
                    used_mib=used,
                    budget_mib=worker.spec.budget_mib,
                )
                self._over_budget.add(worker.name)
            elif not over:
                self._over_budget.discard(worker.name)

    async def _free_on(self, uuid: str) -> tuple[int, str]:
        """Free MiB on a GPU right now (config reservation included) and who holds the rest."""
        host = await self._backend.snapshot()
        gpu = host.by_uuid(uuid)
        if gpu is None:
            return 0, "GPU not found"
        owners = self.our_pids()
        holders = ", ".join(
            f"pid {p.pid} {owners.get(p.pid, 'not ours')} {p.used_mib or 0} MiB"
            for p in gpu.processes
        )
        reserved = self._reserved(host).get(uuid, 0)
        return gpu.free_mib - reserved, holders or "nothing listed"

    # -- acting ---------------------------------------------------------------------------
    def _gate(self, uuid: str) -> GpuGate:
        gate = self._gates.get(uuid)
        if gate is None:
            gate = GpuGate(asyncio.Lock(), lambda: self._free_on(uuid))
            self._gates[uuid] = gate
        return gate

    def _start_task(self, owner: ProcessWorker | OllamaSlot) -> None:
        assert self._tg is not None
        self._tasks[id(owner)] = self._tg.create_task(owner.run(), name=f"worker:{owner.name}")

    def _drop_task(self, owner: ProcessWorker | OllamaSlot) -> None:
        task = self._tasks.pop(id(owner), None)
        if task is not None:
            task.cancel()

    def _ensure(self, spec: ModelSpec, replica: int, gpu: GpuSnapshot, *, budget_mib: int) -> None:
        key = (spec.name, replica, gpu.uuid)
        if spec.engine is Engine.VLLM:
            worker = self._vllm.get(key)
            if worker is None:
                worker = self._new_vllm(spec, replica, gpu)
                self._vllm[key] = worker
                self._start_task(worker)
            worker.ensure_running()
            return
        group = self._ollama.get(gpu.uuid)
        if group is None:
            group = _Ollama(self._new_ollama_serve(gpu))
            self._ollama[gpu.uuid] = group
            self._start_task(group.serve)
        group.serve.ensure_running()
        slot = group.slots.get(key)
        if slot is None:
            slot = OllamaSlot(
                spec,
                replica,
                serve=group.serve,
                gate=self._gate(gpu.uuid),
                probe=self._probe,
                clock=self._clock,
                bus=self._bus,
                inflight=self.inflight,
            )
            group.slots[key] = slot
            self._start_task(slot)
        if slot.state in (WorkerState.STOPPED, WorkerState.BACKOFF):
            slot.budget_mib = budget_mib  # the next load uses what the plan grants now
        elif budget_mib < slot.budget_mib and slot.wanted:
            # shrunk to make room for a higher priority: reload with fewer layers on the GPU
            self._bus.emit(
                "worker.shrunk",
                f"{slot.name}: reloading with {budget_mib} MiB in VRAM instead of "
                f"{slot.budget_mib} MiB (partial offload) to make room",
                worker=slot.name,
                budget_mib=budget_mib,
            )
            slot.budget_mib = budget_mib
            slot.restart()
        slot.ensure_running()

    def _stop(self, model: str, replica: int, gpu_uuid: str, reason: StopReason) -> None:
        key = (model, replica, gpu_uuid)
        worker = self._vllm.get(key)
        if worker is not None and worker.wanted:
            bound = self.drain_timeouts.get(model, self.drain_timeouts.get(gpu_uuid))
            worker.ensure_stopped(reason, drain_timeout_s=bound)
        group = self._ollama.get(gpu_uuid)
        slot = group.slots.get(key) if group else None
        if slot is not None and slot.wanted:
            slot.ensure_stopped()

    def _collect_garbage(self) -> None:
        for key, worker in list(self._vllm.items()):
            if (
                not worker.wanted
                and worker.handle is None
                and worker.state
                in (
                    WorkerState.STOPPED,
                    WorkerState.FAILED,
                )
            ):
                self._drop_task(worker)
                del self._vllm[key]
        for uuid, group in list(self._ollama.items()):
            for key, slot in list(group.slots.items()):
                if not slot.wanted and slot.state in (WorkerState.STOPPED, WorkerState.FAILED):
                    self._drop_task(slot)
                    del group.slots[key]
            if not group.slots:
                if group.serve.wanted:
                    group.serve.ensure_stopped(StopReason.DESIRED_REMOVED, drain=False)
                elif group.serve.handle is None and group.serve.state not in RUNNING_STATES:
                    self._drop_task(group.serve)
                    del self._ollama[uuid]

    # -- building workers ---------------------------------------------------------------------
    def _used_ports(self) -> set[int]:
        ports = {w.spec.port for w in self._vllm.values()}
        ports |= {g.serve.spec.port for g in self._ollama.values()}
        return ports

    def _alloc_port(self, engine: Engine) -> int:
        rng = (
            self.cfg.engines.vllm.ports if engine is Engine.VLLM else self.cfg.engines.ollama.ports
        )
        used = self._used_ports()
        for port in range(rng.first, rng.last + 1):
            if port not in used and _port_free(port):
                return port
        raise RuntimeError(
            f"no free port left in engines.{engine.value}.ports {rng.first}-{rng.last}"
        )

    def _new_vllm(
        self, spec: ModelSpec, replica: int, gpu: GpuSnapshot, *, port: int | None = None
    ) -> ProcessWorker:
        engine = self.cfg.engines.vllm
        port = port or self._alloc_port(Engine.VLLM)
        grace = spec.health.stop_grace_s
        launch = vllm_adapter.launch(
            spec,
            command=engine.command,
            port=port,
            gpu_index=gpu.index,
            gpu_total_mib=gpu.total_mib,
            base_env=self._engine_env,
            engine_extra_env=engine.env,
            shutdown_timeout_s=max(1, int(grace) - 10) if engine.shutdown_timeout else None,
        )
        standby = replica == STANDBY_REPLICA
        if standby:
            name = f"{spec.name}~standby"
        elif spec.replicas <= 1 and replica == 0:
            name = spec.name
        else:
            name = f"{spec.name}#{replica}"
        key = safe_key(f"vllm-{spec.name}-{replica}-{gpu.uuid}")
        wspec = WorkerSpec(
            name=name,
            engine="vllm",
            models=(spec.name,),
            gpu_uuid=gpu.uuid,
            gpu_index=gpu.index,
            budget_mib=spec.budget_mib,
            port=port,
            argv=launch.argv,
            env=launch.env,
            log_path=self._paths.log_dir / f"{key}.log",
            health=spec.health,
            drain_timeout_s=spec.health.drain_timeout_s,
            standby_mib=spec.standby_mib if standby else 0,
        )
        target = target_id(name, gpu.uuid)
        checks = VllmChecks(
            self._probe,
            launch.base_url,
            spec.served,
            timeout_s=spec.health.probe_timeout_s,
            gateway_busy=lambda: self.inflight.count(target),
        )
        return self._worker(
            wspec,
            checks,
            key=key,
            model=spec.name,
            replica=replica,
            sleeper=checks if spec.standby else None,
        )

    def _new_ollama_serve(self, gpu: GpuSnapshot, *, port: int | None = None) -> ProcessWorker:
        engine = self.cfg.engines.ollama
        port = port or self._alloc_port(Engine.OLLAMA)
        models_here = sum(1 for m in self.cfg.models if m.engine is Engine.OLLAMA)
        launch = ollama_adapter.launch(
            command=engine.command,
            port=port,
            gpu_uuid=gpu.uuid,
            base_env=self._engine_env,
            engine_extra_env=engine.env,
            max_loaded_models=max(3, models_here + 1),
        )
        key = safe_key(f"ollama-{gpu.uuid}")
        ollama_models = [m for m in self.cfg.models if m.engine is Engine.OLLAMA]
        health = ollama_models[0].health if ollama_models else self.cfg.models[0].health
        wspec = WorkerSpec(
            name=f"ollama@gpu{gpu.index}",
            engine="ollama",
            models=(),
            gpu_uuid=gpu.uuid,
            gpu_index=gpu.index,
            budget_mib=0,
            port=port,
            argv=launch.argv,
            env=launch.env,
            log_path=self._paths.log_dir / f"{key}.log",
            health=health,
        )
        checks = OllamaChecks(self._probe, launch.base_url, timeout_s=health.probe_timeout_s)
        return self._worker(wspec, checks, key=key, model=None, replica=0)

    def _worker(
        self,
        wspec: WorkerSpec,
        checks: VllmChecks | OllamaChecks,
        *,
        key: str,
        model: str | None,
        replica: int,
        sleeper: VllmChecks | None = None,
    ) -> ProcessWorker:
        records = self._paths.records

        def on_spawn(worker: ProcessWorker, handle: ProcessHandle) -> None:
            records.save(_record(worker, handle, model))

        worker = ProcessWorker(
            wspec,
            checks=checks,
            launcher=self._launcher,
            clock=self._clock,
            bus=self._bus,
            gate=self._gate(wspec.gpu_uuid),
            on_spawn=on_spawn,
            on_exit=lambda w: records.remove(w.record_key),
            sleeper=sleeper,
        )
        worker.record_key = key
        worker.record_replica = replica
        return worker

    # -- adoption ---------------------------------------------------------------------------
    async def _adopt(self) -> None:
        """Re-attach to engines a previous fleetd left running (records in the state dir)."""
        records, problems = self._paths.records.load_all()
        for text in problems:
            self._bus.emit("state.record_unreadable", text)
        if not records:
            return
        host = await self._backend.snapshot()
        for rec in records:
            gpu = host.by_uuid(rec.gpu_uuid)
            handle = self._launcher.adopt(rec.pid, rec.create_time)
            spec = self.cfg.model_named(rec.model) if rec.model else None
            if handle is None or gpu is None or (rec.engine == "vllm" and spec is None):
                await self._forget(rec, handle, gpu_gone=gpu is None)
                continue
            if rec.engine == "vllm" and spec is not None:
                worker = self._new_vllm(spec, rec.replica, gpu, port=rec.port)
                if list(worker.spec.argv) != rec.argv:
                    # the config changed how this model runs: adopt it so it is stopped cleanly
                    self._bus.emit(
                        "worker.respec",
                        f"{rec.name}: recorded command differs from the config; it will restart",
                        worker=rec.name,
                    )
                worker.adopt(handle)
                self._vllm[(spec.name, rec.replica, gpu.uuid)] = worker
                self._start_task(worker)
            else:
                serve = self._new_ollama_serve(gpu, port=rec.port)
                serve.adopt(handle)
                self._ollama[gpu.uuid] = _Ollama(serve)
                self._start_task(serve)
            self._bus.emit(
                "worker.adopted",
                f"adopted {rec.name} (pid {rec.pid}, port {rec.port}) from the previous fleetd",
                worker=rec.name,
                pid=rec.pid,
            )

    async def _forget(
        self, rec: WorkerRecord, handle: ProcessHandle | None, *, gpu_gone: bool
    ) -> None:
        why = (
            "its process is gone"
            if handle is None
            else "its GPU is gone"
            if gpu_gone
            else "not configured"
        )
        # whatever is left in its process group (vLLM's orphaned EngineCore) holds VRAM: end it
        from fleetd.runtime.launcher import group_members, wait_gone  # noqa: PLC0415

        leftovers = group_members(rec.pid)
        if handle is not None:
            from fleetd.runtime.launcher import stop_group  # noqa: PLC0415

            await stop_group(handle, grace_s=10.0)
        elif leftovers:
            import os  # noqa: PLC0415
            import signal  # noqa: PLC0415

            with contextlib.suppress(ProcessLookupError):
                os.killpg(rec.pid, signal.SIGKILL)
            # the first plan must not see their VRAM as taken: wait until they are gone
            await wait_gone(leftovers, timeout_s=5.0)
        self._paths.records.remove(rec.key)
        self._bus.emit(
            "worker.record_dropped",
            f"dropped record of {rec.name} (pid {rec.pid}): {why}"
            + (f"; killed leftover pids {leftovers}" if leftovers else ""),
            worker=rec.name,
        )


def _record(worker: ProcessWorker, handle: ProcessHandle, model: str | None) -> WorkerRecord:
    """What the state dir keeps of a running engine, for the next fleetd to adopt it."""
    spec = worker.spec
    return WorkerRecord(
        key=worker.record_key,
        name=worker.name,
        engine=spec.engine,
        pid=handle.pid,
        create_time=handle.create_time,
        argv=list(spec.argv),
        port=spec.port,
        gpu_uuid=spec.gpu_uuid,
        log_path=str(spec.log_path),
        model=model,
        replica=worker.record_replica,
    )


def fault_policy(cfg: FleetConfig) -> FaultPolicy:
    """The fault policy's knobs from ``[gpus]``."""
    g = cfg.gpus
    return FaultPolicy(
        debounce_s=g.health_debounce_s,
        failback=g.failback,
        failback_after_s=g.failback_after_s,
        max_moves=g.max_moves,
        moves_window_s=g.moves_window_s,
    )


def _tree(handle: ProcessHandle | None) -> frozenset[int]:
    """The pids of a worker's process tree (the leader and its descendants)."""
    if handle is None or handle.exited():
        return frozenset()
    try:
        leader = psutil.Process(handle.pid)
        return frozenset({handle.pid, *(c.pid for c in leader.children(recursive=True))})
    except psutil.Error:
        return frozenset()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
