"""Read views of the daemon for the control API: status and explain, as schema-shaped JSON.

Pure with respect to the daemon: reads the reconciler's last snapshot, plan and workers,
changes nothing.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from fleetd import __version__
from fleetd.gateway.inflight import target_id
from fleetd.model.units import fmt_gib
from fleetd.model.worker import WorkerState
from fleetd.planning.types import STANDBY_REPLICA

if TYPE_CHECKING:
    from fleetd.api.schemas import (
        Explain,
        GpuJson,
        OverridesJson,
        PendingJson,
        Status,
        WorkerJson,
    )
    from fleetd.control import Control
    from fleetd.model.worker import WorkerStatus
    from fleetd.obs.events import EventBus
    from fleetd.reconciler import Reconciler


def status(control: Control, *, started_at: float, config_path: str, now_s: float) -> Status:
    """GET /v1/status."""
    rec = control.reconciler
    host = rec.host
    plan = rec.plan
    ours = rec.our_pids()
    gpus: list[GpuJson] = []
    gpu_status = {g.uuid: g.status for g in plan.gpus} if plan is not None else {}
    for gpu in host.gpus if host is not None else ():
        ours_mib = sum(p.used_mib or 0 for p in gpu.processes if p.pid in ours)
        gpus.append(
            {
                "index": gpu.index,
                "uuid": gpu.uuid,
                "name": gpu.name,
                "health": gpu.health.value,
                "health_reason": gpu.health_reason,
                "status": gpu_status.get(gpu.uuid, "ok"),
                "total_mib": gpu.total_mib,
                "used_mib": gpu.used_mib,
                "ours_mib": ours_mib,
                "foreign_mib": max(0, gpu.used_mib - ours_mib),
                "free_mib": gpu.free_mib,
                "temperature_c": gpu.temperature_c,
                "utilization_pct": gpu.utilization_pct,
                "power_w": gpu.power_w,
                "processes": [
                    {
                        "pid": p.pid,
                        "used_mib": p.used_mib,
                        "name": ours.get(p.pid, p.name),
                        "ours": p.pid in ours,
                    }
                    for p in gpu.processes
                ],
            }
        )
    workers = [_worker(w, rec, now_s) for w in rec.workers()]
    pending: list[PendingJson] = (
        [{"model": p.model, "replica": p.replica, "reason": p.reason} for p in plan.pending]
        if plan is not None
        else []
    )
    return {
        "version": __version__,
        "pid": os.getpid(),
        "uptime_s": round(time.time() - started_at, 1),
        "backend": host.backend if host is not None else "",
        "gpus": gpus,
        "workers": workers,
        "pending": pending,
        "overrides": overrides_json(control),
        "config_path": config_path,
        "gateway": control.gateway_status() if control.gateway_status is not None else None,
    }


def overrides_json(control: Control) -> OverridesJson:
    """The overrides in force."""
    ov = control.reconciler.overrides
    return {
        "replicas": dict(sorted(ov.replicas.items())),
        "cordoned": sorted(ov.cordoned),
        "fault_cordoned": sorted(ov.fault_cordoned),
        "drained_gpus": sorted(ov.drained),
        "drained_models": sorted(ov.drained_models),
        "drained_workers": sorted(control.drained_workers),
    }


def _worker(w: WorkerStatus, rec: Reconciler, now_s: float) -> WorkerJson:
    in_state = max(0.0, now_s - w.since_s)
    is_server = w.engine == "ollama" and not w.models
    vram = rec.vram_mib.get(w.name)
    if vram is None:
        owner = rec.find(w.name)
        vram = getattr(owner, "vram_mib", None) if owner is not None else None
    return {
        "name": w.name,
        "engine": "vllm" if w.engine == "vllm" else "ollama",
        "kind": "process" if w.engine == "vllm" or is_server else "model",
        "models": list(w.models),
        "gpu": w.gpu_index,
        "gpu_uuid": w.gpu_uuid,
        "state": w.state.value,
        "reason": w.reason,
        "since_s": round(in_state, 1),
        "uptime_s": round(in_state, 1) if w.state is WorkerState.READY else None,
        "restarts": w.restarts,
        "port": w.port,
        "pid": w.pid,
        "in_flight": rec.inflight.count(target_id(w.name, w.gpu_uuid)),
        "vram_mib": vram if isinstance(vram, int) else None,
        "budget_mib": w.budget_mib,
    }


def explain(control: Control, model: str, bus: EventBus, *, now_s: float) -> Explain:
    """GET /v1/models/{model}/explain: why the model is where it is, or why it is pending."""
    rec = control.reconciler
    spec = rec.cfg.model_named(model)
    assert spec is not None  # the route checked the name
    ov = rec.overrides
    wanted = ov.wanted(model, spec.replicas)
    lines = [
        (
            f"{model}: {spec.engine.value} model {spec.model!r}, budget "
            f"{fmt_gib(spec.budget_mib)} ({spec.vram_gib:g} + {spec.overhead_gib:g} overhead), "
            f"priority {spec.priority}."
        ),
    ]
    if model in ov.drained_models:
        lines.append("An operator drained it: no replica runs until `fleetctl undrain model`.")
    elif model in ov.replicas:
        lines.append(f"Scaled by an operator to {wanted} replica(s) (config: {spec.replicas}).")
    else:
        lines.append(f"The config wants {wanted} replica(s).")
    plan = rec.plan
    placements = plan.placements_for(model) if plan is not None else ()
    by_name = {w.name: w for w in rec.workers()}
    for p in placements:
        name = (
            f"{model}~standby"
            if p.replica == STANDBY_REPLICA
            else model
            if spec.replicas <= 1 and p.replica == 0
            else f"{model}#{p.replica}"
        )
        worker = by_name.get(name)
        where = f"{_replica_label(p.replica)} is placed on gpu{p.gpu_index}"
        if p.moved_from:
            where += " (moving there)"
        elif p.kept:
            where += " (where it runs; not moved without a cause)"
        else:
            where += " (chosen: highest priority first, preferred GPUs, then best fit)"
        if worker is not None:
            where += f"; it is {worker.state.value}: {worker.reason}"
            if worker.state is WorkerState.READY:
                where += f" (for {_ago(now_s - worker.since_s)})"
        lines.append(where + ".")
        if p.note:
            lines.append(f"  {p.note}.")
    pending = [pp for pp in (plan.pending if plan is not None else ()) if pp.model == model]
    lines.extend(f"{_replica_label(pp.replica)} is pending: {pp.reason}." for pp in pending)
    recent = [
        e
        for e in bus.recent(kinds=("worker.", "operator.", "gpu."))
        if e.fields.get("worker", "").split("#")[0] == model
        or e.fields.get("model") == model
        or e.kind in _GPU_STORY  # the faults that moved everything
    ][-8:]
    if recent:
        lines.append("Recent events:")
        lines.extend(
            f"  {time.strftime('%H:%M:%S', time.localtime(e.ts))} {e.message}" for e in recent
        )
    return {
        "model": model,
        "engine": spec.engine.value,
        "budget_mib": spec.budget_mib,
        "priority": spec.priority,
        "replicas_wanted": wanted,
        "lines": lines,
        "placements": [
            {
                "replica": p.replica,
                "gpu": p.gpu_index,
                "gpu_uuid": p.gpu_uuid,
                "kept": p.kept,
                "moved_from": p.moved_from,
                "note": p.note,
            }
            for p in placements
        ],
        "pending": [
            {"model": pp.model, "replica": pp.replica, "reason": pp.reason} for pp in pending
        ],
    }


_GPU_STORY = frozenset(
    {
        "gpu.lost",
        "gpu.degraded",
        "gpu.healthy",
        "gpu.fault_cordoned",
        "gpu.failback",
        "gpu.flapping",
        "gpu.xid_error",
    }
)


def _replica_label(replica: int) -> str:
    return "The warm standby" if replica == STANDBY_REPLICA else f"Replica {replica}"


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
