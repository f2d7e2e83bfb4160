"""Render a plan for people (a table that fits 80 columns) and for programs (JSON).

Pure formatting: it takes a ``Plan`` and the config and returns text or JSON-able data.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from fleetd.model.units import fmt_gib
from fleetd.planning.types import STANDBY_REPLICA

if TYPE_CHECKING:
    from rich.console import RenderableType

    from fleetd.config import FleetConfig
    from fleetd.model.gpu import HostSnapshot
    from fleetd.planning.types import Placement, Plan


def _gib(mib: int) -> str:
    return fmt_gib(mib).removesuffix(" GiB")


def _action(p: Placement) -> str:
    if p.kept:
        return "keep"
    if p.moved_from:
        return "move"
    return "start"


def plan_tables(plan: Plan, cfg: FleetConfig, host: HostSnapshot) -> RenderableType:
    """GPUs, placements, pending replicas and stops, as rich tables."""
    engines = {m.name: m.engine.value for m in cfg.models}
    gpus = Table(title=f"GPUs ({host.backend})", box=box.SIMPLE_HEAD, title_justify="left")
    gpus.add_column("GPU", no_wrap=True)
    gpus.add_column("NAME", no_wrap=True, overflow="ellipsis", max_width=22)
    gpus.add_column("STATUS", overflow="fold")
    for col in ("USABLE", "FOREIGN", "PLANNED", "FREE"):
        gpus.add_column(col, justify="right", no_wrap=True)
    for g in plan.gpus:
        style = "" if g.status == "ok" else "bold red" if g.status.startswith("lost") else "yellow"
        gpus.add_row(
            f"gpu{g.index}",
            g.name.removeprefix("NVIDIA ").removeprefix("GeForce "),
            Text(g.status, style=style),
            _gib(g.usable_mib),
            _gib(g.foreign_mib),
            _gib(g.committed_mib),
            _gib(g.free_mib),
        )
    gpus.caption = "memory in GiB; FOREIGN = held by processes fleetd does not run"
    gpus.caption_justify = "left"

    placed = Table(title="Placements", box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("MODEL", "ENGINE", "GPU", "BUDGET", "PRIO", "ACTION"):
        placed.add_column(
            col, no_wrap=True, justify="right" if col in {"BUDGET", "PRIO"} else "left"
        )
    placed.add_column("NOTE", overflow="fold")
    for p in plan.placements:
        placed.add_row(
            _replica_name(p.model, p.replica, cfg),
            engines.get(p.model, "?"),
            f"gpu{p.gpu_index}",
            _gib(p.budget_mib),
            str(p.priority),
            _action(p),
            p.note,
        )
    parts: list[RenderableType] = [gpus, placed]
    if plan.pending:
        pending = Table(title="Pending", box=box.SIMPLE_HEAD, title_justify="left")
        pending.add_column("MODEL", no_wrap=True, style="yellow")
        pending.add_column("REASON", overflow="fold")
        for q in plan.pending:
            pending.add_row(_replica_name(q.model, q.replica, cfg), q.reason)
        parts.append(pending)
    if plan.stops:
        stops = Table(title="Stops", box=box.SIMPLE_HEAD, title_justify="left")
        stops.add_column("MODEL", no_wrap=True)
        stops.add_column("CAUSE", no_wrap=True)
        stops.add_column("DETAIL", overflow="fold")
        for s in plan.stops:
            stops.add_row(_replica_name(s.model, s.replica, cfg), s.cause.value, s.detail)
        parts.append(stops)
    summary = (
        f"{len(plan.placements)} replica(s) placed, {len(plan.pending)} pending, "
        f"{len(plan.stops)} to stop"
    )
    parts.append(Text(summary, style="bold"))
    return Group(*parts)


def _replica_name(model: str, replica: int, cfg: FleetConfig) -> str:
    if replica == STANDBY_REPLICA:
        return f"{model}~standby"
    spec = cfg.model_named(model)
    if spec is not None and spec.replicas <= 1 and replica == 0:
        return model
    return f"{model}#{replica}"


def print_plan(plan: Plan, cfg: FleetConfig, host: HostSnapshot, console: Console) -> None:
    """Print the plan tables."""
    console.print(plan_tables(plan, cfg, host))


def to_jsonable(obj: Any) -> Any:  # noqa: ANN401 - generic JSON conversion
    """Dataclasses, enums and tuples as plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple, frozenset, set)):
        items = [to_jsonable(x) for x in obj]
        return sorted(items, key=str) if isinstance(obj, (set, frozenset)) else items
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    return obj
