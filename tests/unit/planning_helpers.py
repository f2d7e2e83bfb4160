"""Shared builders for planner tests: recorded GPU inventories and compact model specs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fleetd.config import ModelSpec
from fleetd.model.gpu import GpuHealth, GpuProcess, GpuSnapshot, HostSnapshot

DATA = Path(__file__).resolve().parent.parent / "data" / "gpus"


def inventory(name: str) -> HostSnapshot:
    """Load tests/data/gpus/<name>.json as a HostSnapshot."""
    doc = json.loads((DATA / f"{name}.json").read_text())
    return HostSnapshot(gpus=tuple(gpu_from_json(g) for g in doc["gpus"]), backend="recorded")


def gpu_from_json(g: dict[str, Any]) -> GpuSnapshot:
    return GpuSnapshot(
        index=g["index"],
        uuid=g["uuid"],
        name=g["name"],
        total_mib=g["total_mib"],
        reserved_mib=g["reserved_mib"],
        used_mib=g["used_mib"],
        free_mib=g["free_mib"],
        processes=tuple(GpuProcess(**p) for p in g.get("processes", [])),
        health=GpuHealth(g.get("health", "healthy")),
        health_reason=g.get("health_reason", ""),
    )


def host(*totals_mib: int, lost: tuple[int, ...] = ()) -> HostSnapshot:
    """An idle host with GPUs of the given sizes; indices in ``lost`` are lost."""
    return HostSnapshot(
        gpus=tuple(
            GpuSnapshot(
                index=i,
                uuid=f"GPU-{i:08d}-0000-0000-0000-000000000000",
                name="test gpu",
                total_mib=t,
                reserved_mib=0,
                used_mib=0,
                free_mib=t,
                health=GpuHealth.LOST if i in lost else GpuHealth.HEALTHY,
                health_reason="GPU is lost" if i in lost else "",
            )
            for i, t in enumerate(totals_mib)
        )
    )


def model(name: str, gib: float, *, prio: int = 0, engine: str = "vllm", **kw: Any) -> ModelSpec:
    """A model whose whole budget is ``gib`` (no overhead unless given)."""
    kw.setdefault("overhead_gib", 0.0)
    return ModelSpec(name=name, engine=engine, model=name, vram_gib=gib, priority=prio, **kw)
