"""Text for people from the control API's JSON: ``fleetctl status``, ``explain`` and events.

Pure functions (data in, lines out) so they are tested without a daemon or a terminal: the
caller passes the width and whether to colour. Every line fits the width it is given
(long names are truncated with an ellipsis, long reasons wrapped), so ``fleetctl status``
stays readable at a glance on an 80-column terminal with eight GPUs.

It imports only the standard library and ``fleetd.model.units`` (no rich: fleetctl must
start fast), and the API's TypedDicts only for type checking.
"""

from __future__ import annotations

import re
import textwrap
import time
from typing import TYPE_CHECKING

from fleetd.model import units

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from fleetd.api.schemas import EventJson, Explain, GpuJson, Status, WorkerJson

# A cell: (visible text, style). Styles are names in _SGR, or "bar" for a memory bar.
Cell = tuple[str, str]

_SGR = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "cyan": "36"}
_BAR_STYLE = {"#": "green", "=": "yellow", ".": "dim"}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_BAR_RUNS = re.compile(r"#+|=+|\.+")
_ELLIPSIS = "\u2026"

BAR_MIN_CELLS = 8
BAR_MAX_CELLS = 32
_REASON_MIN_WIDTH = 30
STANDBY_REPLICA = 64  # fleetd.planning.types.STANDBY_REPLICA: a model's warm standby
# fleetd.model.worker.RUNNING_STATES
RUNNING = frozenset({"starting", "ready", "draining", "standby"})

STATE_STYLE = {
    "ready": "green",
    "starting": "yellow",
    "standby": "cyan",
    "draining": "yellow",
    "stopping": "yellow",
    "stopped": "dim",
    "backoff": "red",
    "failed": "red",
}
GPU_STATUS_STYLE = {"ok": "green", "cordoned": "yellow", "drained": "yellow", "degraded": "yellow"}


def paint(text: str, style: str, *, colour: bool) -> str:
    """``text`` in ANSI colour ``style`` (a name in _SGR, or "bar"); unchanged without colour."""
    if not colour or not style or not text:
        return text
    if style == "bar":
        return _BAR_RUNS.sub(lambda m: paint(m[0], _BAR_STYLE[m[0][0]], colour=True), text)
    return f"\x1b[{_SGR[style]}m{text}\x1b[0m"


def visible_len(line: str) -> int:
    """The number of columns a line takes on screen (ANSI colour codes take none)."""
    return len(_ANSI.sub("", line))


def truncate(text: str, width: int, *, middle: bool = False) -> str:
    """``text`` cut to ``width`` columns, with an ellipsis at the end or in the middle.

    The middle keeps a name's distinctive tail, such as a replica's ``#3``.
    """
    if len(text) <= width:
        return text
    if width <= 1:
        return _ELLIPSIS[:width]
    tail = (width - 1) // 3 if middle else 0
    return text[: width - 1 - tail] + _ELLIPSIS + text[len(text) - tail :]


def clip(line: str, width: int) -> str:
    """A line (possibly coloured) cut to ``width`` visible columns: the last guard of the fit."""
    if visible_len(line) <= width:
        return line
    out: list[str] = []
    shown = 0
    pos = 0
    while pos < len(line) and shown < width - 1:
        match = _ANSI.match(line, pos)
        if match:
            out.append(match.group())
            pos = match.end()
            continue
        out.append(line[pos])
        shown += 1
        pos += 1
    out.append(_ELLIPSIS)
    if "\x1b[" in line:
        out.append("\x1b[0m")
    return "".join(out)


def wrap(text: str, width: int, *, indent: int = 0, first: str | None = None) -> list[str]:
    """``text`` wrapped to ``width``, indented by ``indent`` (the first line by ``first``)."""
    pad = " " * indent
    first = pad if first is None else first
    lines = textwrap.wrap(
        text,
        width=max(width, indent + 10),
        initial_indent=first,
        subsequent_indent=pad,
        break_on_hyphens=False,
    )
    return lines or [first.rstrip()]


def fmt_duration(seconds: float | None) -> str:
    """A duration for people: ``42s``, ``3m12s``, ``2h05m``, ``3d04h``; ``-`` when unknown."""
    if seconds is None or seconds < 0:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def gib(mib: float) -> str:
    """MiB as GiB with one decimal and no unit (``units.fmt_gib``'s rounding)."""
    return units.fmt_gib(mib).removesuffix(" GiB")


def bar_cells(ours_mib: int, foreign_mib: int, total_mib: int, cells: int) -> tuple[int, int, int]:
    """How many of ``cells`` show ours, foreign and free memory (in that order).

    Proportional (largest remainders), but any non-zero amount gets at least one cell, so a
    small foreign process or the last free GiB never disappears in rounding. Free here is
    what ours and foreign leave of the total (NVML's reserved memory included); the numbers
    beside the bar are the exact ones.
    """
    if total_mib <= 0 or cells <= 0:
        return 0, 0, max(cells, 0)
    amounts = [max(ours_mib, 0), max(foreign_mib, 0)]
    amounts.append(max(total_mib - sum(amounts), 0))
    whole = sum(amounts)
    exact = [a * cells / whole for a in amounts]
    got = [int(x) for x in exact]
    for i in sorted(range(3), key=lambda i: got[i] - exact[i])[: cells - sum(got)]:
        got[i] += 1
    for i in range(3):
        biggest = max(range(3), key=lambda j: got[j])
        if amounts[i] > 0 and got[i] == 0 and got[biggest] > 1:
            got[biggest] -= 1
            got[i] += 1
    return got[0], got[1], got[2]


def memory_bar(ours_mib: int, foreign_mib: int, total_mib: int, cells: int) -> str:
    """``[####====......]``: ours ``#``, foreign ``=``, free ``.``, ``cells`` wide inside."""
    ours, foreign, free = bar_cells(ours_mib, foreign_mib, total_mib, cells)
    return "[" + "#" * ours + "=" * foreign + "." * free + "]"


def short_gpu_name(name: str) -> str:
    """``NVIDIA GeForce RTX 4070 Ti SUPER`` -> ``RTX 4070 Ti SUPER``."""
    for prefix in ("NVIDIA ", "GeForce ", "Tesla ", "Quadro "):
        name = name.removeprefix(prefix)
    return name


def _widths(headers: Sequence[str], rows: Sequence[Sequence[Cell]]) -> list[int]:
    return [max([len(h)] + [len(r[i][0]) for r in rows]) for i, h in enumerate(headers)]


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Cell]],
    *,
    width: int,
    colour: bool,
    right: frozenset[int] = frozenset(),
    flex: int = 0,
    gaps: Sequence[int] = (),
) -> list[str]:
    """Columns sized to their content; column ``flex`` shrinks (truncating) to fit ``width``.

    ``gaps[i]`` is the space before column ``i + 1`` (default 2); rows are indented by 2.
    """
    gaps = list(gaps) or [2] * (len(headers) - 1)
    widths = _widths(headers, rows)
    overflow = 2 + sum(widths) + sum(gaps) - width
    if overflow > 0:
        widths[flex] = max(len(headers[flex]), 4, widths[flex] - overflow)

    def line(cells: Sequence[Cell]) -> str:
        parts = ["  "]
        for i, (text, style) in enumerate(cells):
            shown = truncate(text, widths[i], middle=i == flex)
            pad = " " * (widths[i] - len(shown))
            shown = paint(shown, style, colour=colour)
            parts.append(" " * gaps[i - 1] if i else "")
            parts.append(pad + shown if i in right else shown + pad)
        return clip("".join(parts).rstrip(), width)

    out = [line([(h, "dim") for h in headers])]
    out.extend(line(r) for r in rows)
    return out


def _gpu_labels(status: Status) -> dict[str, str]:
    return {g["uuid"]: f"gpu{g['index']}" for g in status["gpus"]}


def _gpu_rows(gpus: Sequence[GpuJson], bar_width: int) -> list[list[Cell]]:
    rows: list[list[Cell]] = []
    for g in gpus:
        word = g["status"].split(":", 1)[0].strip() or "?"
        style = "red" if g["health"] == "lost" else GPU_STATUS_STYLE.get(word, "yellow")
        temp = g["temperature_c"]
        util = g["utilization_pct"]
        rows.append(
            [
                (str(g["index"]), ""),
                (short_gpu_name(g["name"]), ""),
                (word, style),
                ("-" if temp is None else f"{temp}C", ""),
                ("-" if util is None else f"{util}%", ""),
                (memory_bar(g["ours_mib"], g["foreign_mib"], g["total_mib"], bar_width), "bar"),
                (gib(g["ours_mib"]), ""),
                (gib(g["foreign_mib"]), ""),
                (gib(g["free_mib"]), ""),
            ]
        )
    return rows


def _gpu_section(status: Status, *, width: int, colour: bool) -> list[str]:
    gpus = status["gpus"]
    title = paint("GPUS", "bold", colour=colour)
    legend = "memory GiB: # ours  = foreign  . free"
    out = [clip(f"{title}  {paint(legend, 'dim', colour=colour)}", width)]
    if not gpus:
        return [*out, "  none"]
    headers = ("GPU", "NAME", "STATUS", "TEMP", "UTIL", "MEMORY", "OURS", "FRGN", "FREE")
    gaps = (2, 2, 1, 1, 2, 1, 1, 1)
    # Size every column but the bar from the data, then give the bar what is left; when
    # that is too little the name gives way (``table`` truncates its flexible column).
    widths = _widths(headers, _gpu_rows(gpus, 0))
    others = 2 + sum(widths) - widths[5] + sum(gaps)
    cells = max(BAR_MIN_CELLS, min(BAR_MAX_CELLS, width - others - 2))
    rows = _gpu_rows(gpus, cells)
    out += table(
        headers,
        rows,
        width=width,
        colour=colour,
        right=frozenset({3, 4, 6, 7, 8}),
        flex=1,
        gaps=gaps,
    )
    for g in gpus:
        detail = g["status"] if ":" in g["status"] else ""
        if not detail and g["health"] != "healthy" and g["health_reason"]:
            detail = f"{g['health']}: {g['health_reason']}"
        if detail:
            lines = wrap(detail, width, indent=8, first=f"  gpu{g['index']}  ")
            out += [paint(line, "dim", colour=colour) for line in lines]
    return out


def _worker_row(w: WorkerJson) -> list[Cell]:
    vram = "-" if w["vram_mib"] is None else gib(w["vram_mib"])
    budget = gib(w["budget_mib"]) if w["budget_mib"] else "-"  # an Ollama server has none
    return [
        (w["name"], ""),
        (w["engine"], ""),
        (str(w["gpu"]), ""),
        (w["state"], STATE_STYLE.get(w["state"], "")),
        (fmt_duration(w["uptime_s"]), ""),
        (str(w["restarts"]), "red" if w["restarts"] else ""),
        ("-" if w["port"] is None else str(w["port"]), ""),
        ("-" if vram == budget == "-" else f"{vram}/{budget}", ""),
    ]


def _worker_section(status: Status, *, width: int, colour: bool) -> list[str]:
    workers = status["workers"]
    out = [paint(f"WORKERS ({len(workers)})", "bold", colour=colour)]
    if not workers:
        return [*out, "  none"]
    headers = ("NAME", "ENGINE", "GPU", "STATE", "UPTIME", "RESTARTS", "PORT", "VRAM/BUDGET")
    rows = [_worker_row(w) for w in workers]
    lines = table(headers, rows, width=width, colour=colour, right=frozenset({2, 4, 5, 6, 7}))
    out.append(lines[0])
    for w, line in zip(workers, lines[1:], strict=True):
        out.append(line)
        if w["state"] != "ready" and w["reason"]:
            note = f"{w['state']} for {fmt_duration(w['since_s'])}: {w['reason']}"
            out += [paint(x, "dim", colour=colour) for x in wrap(note, width, indent=6)]
    return out


def _pending_section(status: Status, *, width: int, colour: bool) -> list[str]:
    pending = status["pending"]
    if not pending:
        return [f"{paint('PENDING', 'bold', colour=colour)}  none"]
    out = [paint(f"PENDING ({len(pending)})", "bold", colour=colour)]
    labels = [
        p["model"]
        if p["replica"] == 0
        else f"{p['model']}~standby"
        if p["replica"] == STANDBY_REPLICA
        else f"{p['model']}#{p['replica']}"
        for p in pending
    ]
    label_width = max([len(x) for x in labels if len(x) <= 28], default=0)
    hang = 2 + label_width + 2
    for label, p in zip(labels, pending, strict=True):
        head = "  " + paint(truncate(label, width - 4), "yellow", colour=colour)
        if len(label) > label_width or width - hang < _REASON_MIN_WIDTH:
            out.append(clip(head, width))
            out += wrap(p["reason"], width, indent=6)
            continue
        body = textwrap.wrap(p["reason"], width - hang, break_on_hyphens=False) or [""]
        out.append(head + " " * (hang - 2 - len(label)) + body[0])
        out += [" " * hang + x for x in body[1:]]
    return out


def _override_section(status: Status, *, width: int, colour: bool) -> list[str]:
    ov = status["overrides"]
    labels = _gpu_labels(status)
    items = [
        ("replicas", [f"{m}={n}" for m, n in sorted(ov["replicas"].items())]),
        ("cordoned", [labels.get(u, u) for u in ov["cordoned"]]),
        ("drained gpus", [labels.get(u, u) for u in ov["drained_gpus"]]),
        ("drained models", list(ov["drained_models"])),
        ("drained workers", list(ov["drained_workers"])),
    ]
    active = [(k, v) for k, v in items if v]
    if not active:
        return [f"{paint('OVERRIDES', 'bold', colour=colour)}  none"]
    out = [paint("OVERRIDES", "bold", colour=colour)]
    for key, values in active:
        out += wrap(", ".join(values), width, indent=19, first=f"  {key:<15}  ")
    return out


def render_status(status: Status, *, width: int, colour: bool) -> list[str]:
    """``fleetctl status``: a header, GPUs, workers, pending replicas and overrides.

    Raises KeyError or TypeError on a document that does not follow ``Status``; the caller
    reports that as a malformed response.
    """
    width = max(width, 40)
    head = (
        f"fleetd {status['version']}  pid {status['pid']}  up {fmt_duration(status['uptime_s'])}"
        f"  backend {status['backend']}  config {status['config_path']}"
    )
    out = [clip(head, width)]
    gateway = status.get("gateway")
    if gateway:
        out.append(  # what matters first: a narrow terminal clips the request count
            f"gateway {gateway['url']}  {gateway['in_flight']} in flight, "
            f"{gateway['fallbacks']} fallback, {gateway['mid_stream_failures']} cut, "
            f"{gateway['retries']} retry, {gateway['requests']} req"
        )
    out.append("")
    out += _gpu_section(status, width=width, colour=colour)
    out.append("")
    out += _worker_section(status, width=width, colour=colour)
    out.append("")
    out += _pending_section(status, width=width, colour=colour)
    out.append("")
    out += _override_section(status, width=width, colour=colour)
    return [clip(line, width) for line in out]


def render_explain(explain: Explain, *, width: int) -> list[str]:
    """``fleetctl explain``: the daemon's sentences, each wrapped with a hanging indent."""
    out: list[str] = []
    for sentence in explain["lines"]:
        out += wrap(str(sentence), max(width, 40), indent=2, first="")
    return out


def render_event(event: EventJson) -> str:
    """One event as ``HH:MM:SS seq kind message`` (local time)."""
    clock = time.strftime("%H:%M:%S", time.localtime(float(event["ts"])))
    return f"{clock} {event['seq']} {event['kind']} {event['message']}"


# --- what --wait waits for: verdicts on a Status --------------------------------------------------

Verdict = tuple[bool, str] | str  # (succeeded, final message) when done, else progress in words


def is_replica(w: WorkerJson) -> bool:
    """A worker that serves one model replica (not an Ollama server holding several)."""
    return w["engine"] == "vllm" or w["kind"] == "model"


def on_gpu(w: WorkerJson, gpu: str) -> bool:
    """Whether ``w`` runs on ``gpu`` (an index, ``gpuN`` or a UUID, as the API accepts)."""
    index = gpu.removeprefix("gpu")
    return w["gpu_uuid"] == gpu or (index.isdigit() and w["gpu"] == int(index))


def _listing(workers: Sequence[WorkerJson]) -> str:
    names = ", ".join(f"{w['name']} ({w['state']} on gpu{w['gpu']})" for w in workers[:4])
    return names + (f" and {len(workers) - 4} more" if len(workers) > 4 else "")


class Goal:
    """A condition on /v1/status that ends --wait, and the names that make an event relevant."""

    def __init__(self, label: str, names: set[str]) -> None:
        self.label = label
        self.names = names

    def verdict(self, status: Status, elapsed_s: float) -> Verdict:
        """Done: (succeeded, message); not yet: what it waits on. ``elapsed_s``: since asked."""
        raise NotImplementedError

    def relevant(self, event: EventJson) -> bool:
        """Whether the event mentions the target (in its kind, message or extra fields)."""
        text = " ".join(str(v) for v in event.values())
        return any(name in text for name in self.names)


class WorkerStopped(Goal):
    """drain worker: the worker is gone from its GPU, or stopped (or failed) there.

    Matched by name *and* GPU: a replica's replacement elsewhere has the same name.
    """

    def __init__(self, name: str, gpu_uuid: str | None) -> None:
        super().__init__(f"worker {name} to stop", {name})
        self.name = name
        self.gpu_uuid = gpu_uuid

    def verdict(self, status: Status, elapsed_s: float) -> Verdict:  # noqa: ARG002 - the Goal API
        """Done when no worker of that name runs on the GPU it ran on."""
        named = [w for w in status["workers"] if w["name"] == self.name]
        here = [w for w in named if self.gpu_uuid in (None, w["gpu_uuid"])]
        busy = [w for w in here if w["state"] not in {"stopped", "failed"}]
        if busy:
            return f"worker {self.name} is {busy[0]['state']} on gpu{busy[0]['gpu']}"
        done = (
            f"worker {self.name} is {here[0]['state']}" if here else f"worker {self.name} is gone"
        )
        moved = [w for w in named if w not in here]
        if moved:
            done += f"; its replacement is {moved[0]['state']} on gpu{moved[0]['gpu']}"
        return True, done


class GroupStopped(Goal):
    """drain model / drain gpu: none of the matching workers is starting, ready or draining."""

    def __init__(self, label: str, names: set[str], match: Callable[[WorkerJson], bool]) -> None:
        super().__init__(label, names)
        self.match = match

    def verdict(self, status: Status, elapsed_s: float) -> Verdict:  # noqa: ARG002 - the Goal API
        """Done when no matching worker runs."""
        mine = [w for w in status["workers"] if self.match(w)]
        self.names.update(w["name"] for w in mine)
        running = [w for w in mine if w["state"] in RUNNING]
        if not running:
            return True, f"{self.label} is drained: none of its workers runs"
        return f"{len(running)} still running: {_listing(running)}"


class Restarted(Goal):
    """restart: the worker is ready again (new pid, or ready since we asked); exit 1 if failed."""

    def __init__(self, name: str, old_pid: int | None) -> None:
        super().__init__(f"worker {name} to restart", {name})
        self.name = name
        self.old_pid = old_pid

    def verdict(self, status: Status, elapsed_s: float) -> Verdict:
        """Done when ready in a new life; failed when it entered ``failed`` after the request."""
        found = [w for w in status["workers"] if w["name"] == self.name]
        if not found:
            return f"worker {self.name} is not listed"
        w = found[0]
        # since_s is the time in the current state: less than our elapsed time means the
        # worker entered it after the request (an Ollama model slot keeps its server's pid).
        after_request = w["since_s"] < elapsed_s
        if w["state"] == "ready" and (after_request or w["pid"] != self.old_pid):
            return True, f"worker {self.name} is ready again (pid {w['pid']})"
        if w["state"] == "failed" and after_request:
            return False, f"worker {self.name} failed: {w['reason']}"
        return f"worker {self.name} is {w['state']}"


class Scaled(Goal):
    """scale: N ready replicas and none starting or stopping; a pending replica fails it."""

    def __init__(self, model: str, replicas: int) -> None:
        super().__init__(f"model {model} to have {replicas} ready replica(s)", {model})
        self.model = model
        self.replicas = replicas

    def verdict(self, status: Status, elapsed_s: float) -> Verdict:  # noqa: ARG002 - the Goal API
        """Done when N are ready and settled; failed when a wanted replica is pending."""
        # Replicas are numbered from 0: a pending replica >= N is one this scale removes.
        pending = [
            p
            for p in status["pending"]
            if p["model"] == self.model and p["replica"] < self.replicas
        ]
        if pending:
            reasons = "; ".join(f"replica {p['replica']}: {p['reason']}" for p in pending)
            return False, f"model {self.model} is pending: {reasons}"
        mine = [w for w in status["workers"] if self.model in w["models"] and is_replica(w)]
        self.names.update(w["name"] for w in mine)
        ready = sum(w["state"] == "ready" for w in mine)
        moving = [w for w in mine if w["state"] in {"starting", "draining", "stopping"}]
        if ready == self.replicas and not moving:
            return True, f"model {self.model} has {ready} ready replica(s)"
        return f"{ready} of {self.replicas} ready" + (f"; {_listing(moving)}" if moving else "")


def drain_goal(target: str, name: str, status: Status | None) -> Goal:
    """What ``drain TARGET NAME --wait`` waits for (``status``: from before the request)."""
    if target == "worker":
        found = [w for w in status["workers"] if w["name"] == name] if status else []
        return WorkerStopped(name, found[0]["gpu_uuid"] if len(found) == 1 else None)
    if target == "model":
        return GroupStopped(
            f"model {name}", {name}, lambda w: name in w["models"] and is_replica(w)
        )
    index = name.removeprefix("gpu")
    tokens = {name, f"gpu{index}"} if index.isdigit() else {name}
    return GroupStopped(f"gpu {name}", tokens, lambda w: on_gpu(w, name))
