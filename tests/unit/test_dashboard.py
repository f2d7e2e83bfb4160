"""packaging/grafana/fleetd-dashboard.json: every query names metrics fleetd really exports.

The reference is the exposition of a real ``FleetMetrics`` fed a realistic snapshot and a few
events, parsed with prometheus_client's own parser: counters appear as ``_total``, histograms
as ``_bucket``/``_sum``/``_count``, and every label a selector names must be on that series.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleetd.model.gpu import GpuHealth, GpuProcess, GpuSnapshot, HostSnapshot
from fleetd.model.worker import WorkerState, WorkerStatus
from fleetd.obs.alerts import Outcome
from fleetd.obs.events import Event
from fleetd.obs.metrics import FleetMetrics, GatewayCounters
from fleetd.planning.types import GpuPlan, Pending, Placement, Plan

DASHBOARD = Path(__file__).parents[2] / "packaging" / "grafana" / "fleetd-dashboard.json"
DATASOURCE = "${datasource}"
UUIDS = ("GPU-00000000-0000-0000-0000-000000000000", "GPU-11111111-1111-1111-1111-111111111111")
GPU_NAME = "NVIDIA GeForce RTX 4070 Ti SUPER"
TOTAL_MIB, RESERVED_MIB = 16376, 311

METRIC = re.compile(r"\bfleetd_[A-Za-z0-9_]+")
SELECTOR = re.compile(r"\b(fleetd_[A-Za-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
LEGEND_LABEL = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
COUNTER_FUNCTIONS = frozenset({"rate", "irate", "increase"})


# -- a real exposition ----------------------------------------------------------------------
@dataclass
class View:
    """A reconciler as metrics see it: the reference lab, two GPUs, vLLM and Ollama."""

    host: HostSnapshot | None = None
    plan: Plan | None = None
    passes: int = 0
    vram_mib: dict[str, int] = field(default_factory=dict)
    statuses: list[WorkerStatus] = field(default_factory=list)
    pids: dict[int, str] = field(default_factory=dict)

    def workers(self) -> Sequence[WorkerStatus]:
        return self.statuses

    def our_pids(self) -> Mapping[int, str]:
        return self.pids


def _gpu(index: int, used_mib: int, processes: tuple[GpuProcess, ...]) -> GpuSnapshot:
    return GpuSnapshot(
        index=index,
        uuid=UUIDS[index],
        name=GPU_NAME,
        total_mib=TOTAL_MIB,
        reserved_mib=RESERVED_MIB,
        used_mib=used_mib,
        free_mib=TOTAL_MIB - RESERVED_MIB - used_mib,
        processes=processes,
        utilization_pct=64,
        temperature_c=58,
        power_w=221.0,
        health=GpuHealth.HEALTHY,
    )


def _worker(
    name: str, state: WorkerState, *, engine: str, gpu: int, models: tuple[str, ...], mib: int
) -> WorkerStatus:
    return WorkerStatus(
        name=name,
        engine=engine,
        gpu_uuid=UUIDS[gpu],
        gpu_index=gpu,
        state=state,
        reason="test",
        port=18100 + gpu,
        pid=100 + gpu,
        restarts=0,
        since_s=0.0,
        models=models,
        budget_mib=mib,
    )


def _placement(model: str, gpu: int, mib: int) -> Placement:
    return Placement(model, 0, UUIDS[gpu], gpu, mib, priority=50, kept=True)


def _fleet() -> View:
    gpus = (
        _gpu(0, 15000, (GpuProcess(100, 14000, "vllm"), GpuProcess(999, 1000, "python"))),
        _gpu(1, 9800, (GpuProcess(101, 9800, "ollama"),)),
    )
    plan = Plan(
        placements=(_placement("mimo-vl", 0, 14336), _placement("deepcoder:14b", 1, 10240)),
        pending=(Pending("deepseek-r1:32b", 0, 22528, 10, "needs 22.0 GiB"),),
        stops=(),
        gpus=tuple(
            GpuPlan(g.uuid, g.index, g.name, g.health, "ok", g.usable_mib, 0, (), 0) for g in gpus
        ),
    )
    return View(
        host=HostSnapshot(gpus=gpus),
        plan=plan,
        passes=12,
        vram_mib={"mimo-vl": 14000},
        statuses=[
            _worker(
                "mimo-vl", WorkerState.READY, engine="vllm", gpu=0, models=("mimo-vl",), mib=14336
            ),
            _worker("ollama@gpu1", WorkerState.READY, engine="ollama", gpu=1, models=(), mib=0),
            _worker(
                "deepcoder:14b",
                WorkerState.STARTING,
                engine="ollama",
                gpu=1,
                models=("deepcoder:14b",),
                mib=10240,
            ),
        ],
        pids={100: "mimo-vl", 101: "ollama@gpu1"},
    )


@cache
def exposition() -> dict[str, tuple[str, frozenset[str]]]:
    """Sample name -> (family type, label names) from a FleetMetrics that saw some of everything."""
    metrics = FleetMetrics(clock=lambda: 1000.0)
    metrics.init_alert_series(["log-to-journal"], [o.value for o in Outcome])
    view = _fleet()
    metrics.refresh(view)
    for event in (
        Event("gpu.xid", "gpu1: xid 79", fields={"gpu_uuid": UUIDS[1], "xid": 79}),
        Event("worker.crashed", "mimo-vl: exited with code 1", fields={"worker": "mimo-vl"}),
        Event("reconcile.error", "nvml timed out", fields={}),
    ):
        metrics.observe_event(event)
    metrics.count_alert("log-to-journal", Outcome.OK.value)
    metrics.observe_reconcile(0.042, ok=True)
    metrics.observe_reconcile(1.7, ok=False)
    metrics.track_gateway(
        lambda: GatewayCounters(
            requests=12,
            in_flight=2,
            by_status={200: 10, 503: 2},
            problems={"retry": 1, "fallback": 2, "mid_stream_failure": 0},
        )
    )
    metrics.refresh(view)
    found: dict[str, tuple[str, set[str]]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            found.setdefault(sample.name, (family.type, set()))[1].update(sample.labels)
    return {name: (kind, frozenset(labels)) for name, (kind, labels) in found.items()}


# -- the dashboard --------------------------------------------------------------------------
@cache
def dashboard() -> dict[str, Any]:
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def panels() -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels of collapsed rows included."""
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def exprs() -> Iterator[tuple[str, str]]:
    """(panel title, expr) of every query, variable queries included."""
    for panel in panels():
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            yield f"${variable['name']}", query if isinstance(query, str) else query["query"]


def strip_strings(expr: str) -> str:
    """The expr with the contents of its string literals blanked (they may hold any bracket)."""
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def unbalanced(expr: str) -> str | None:
    """Why the brackets of ``expr`` do not balance, or None."""
    closing = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for pos, char in enumerate(strip_strings(expr)):
        if char in "([{":
            stack.append(char)
        elif char in closing and (not stack or stack.pop() != closing[char]):
            return f"unexpected {char!r} at {pos}"
    return f"unclosed {stack[-1]!r}" if stack else None


def enclosing_function(expr: str, pos: int) -> str:
    """The name of the function call whose parentheses enclose ``pos`` ('' for none)."""
    depth = 0
    for i in range(pos - 1, -1, -1):
        char = expr[i]
        if char == ")":
            depth += 1
        elif char == "(":
            if depth == 0:
                head = re.search(r"([A-Za-z_][A-Za-z0-9_]*)\s*$", expr[:i])
                name = head.group(1) if head else ""
                return "" if name in {"by", "without"} else name
            depth -= 1
    return ""


def metric_labels(name: str) -> frozenset[str]:
    return exposition()[name][1]


def counter_like(name: str) -> bool:
    """A sample that only makes sense through rate()/increase(): counters, histogram parts."""
    kind = exposition()[name][0]
    return kind == "counter" or (
        kind == "histogram" and name.endswith(("_bucket", "_count", "_sum"))
    )


ALL_EXPRS = list(exprs())


# -- tests ----------------------------------------------------------------------------------
def test_dashboard_is_a_grafana_dashboard_with_panels() -> None:
    doc = dashboard()
    assert doc["schemaVersion"] == 39
    assert doc["uid"]
    assert doc["title"]
    assert [p for p in panels() if p["type"] != "row"]
    assert ALL_EXPRS


def test_template_variables() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("gpu", "model", "worker"):
        query = variables[name]["query"]
        query = query if isinstance(query, str) else query["query"]
        assert re.fullmatch(rf"label_values\(fleetd_\w+(\{{.*\}})?,\s*{name}\)", query), query
        assert variables[name]["datasource"]["uid"] == DATASOURCE
        assert variables[name]["includeAll"]
        assert variables[name]["allValue"] == ".*"  # "All" also matches a label that is ""


def test_every_panel_has_a_title_and_the_datasource_variable() -> None:
    for panel in panels():
        assert panel.get("title"), panel.get("id")
        assert panel.get("datasource", {}).get("uid") == DATASOURCE, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_panel_ids_are_unique() -> None:
    ids = [panel["id"] for panel in panels()]
    assert all(isinstance(i, int) for i in ids)
    assert len(ids) == len(set(ids))


def test_ref_ids_are_unique_within_a_panel() -> None:
    for panel in panels():
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]


def test_panels_fit_the_grid() -> None:
    for panel in panels():
        pos = panel["gridPos"]
        assert pos["x"] >= 0
        assert pos["w"] > 0
        assert pos["x"] + pos["w"] <= 24, panel["title"]


def test_repeated_panels_repeat_over_a_multi_value_variable() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    for panel in panels():
        if "repeat" in panel:
            assert variables[panel["repeat"]]["multi"], panel["title"]


@pytest.mark.parametrize(("title", "expr"), ALL_EXPRS)
def test_brackets_balance(title: str, expr: str) -> None:
    assert unbalanced(expr) is None, f"{title}: {unbalanced(expr)} in {expr}"


def test_the_bracket_check_catches_mistakes() -> None:
    assert unbalanced('sum(rate(x{a="(["}[5m]))') is None
    assert unbalanced("sum(rate(x[5m])") is not None
    assert unbalanced("sum(rate(x[5m)))") is not None
    assert unbalanced('x{a=~"b"]') is not None


def test_exprs_parse_with_promtool(tmp_path: Path) -> None:
    """Where promtool is installed, Prometheus's own parser reads every query."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    grafana = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m"}
    rules = []
    for i, (_, expr) in enumerate(ALL_EXPRS):
        if expr.startswith("label_values("):
            continue  # Grafana's variable query syntax, not PromQL
        promql = re.sub(r"\$\w+", lambda m: grafana.get(m.group(), ".*"), expr)  # variables
        rules.append({"record": f"fleetd:dashboard:{i}", "expr": promql})
    path = tmp_path / "rules.yml"  # JSON is YAML
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_exposition_has_every_kind_of_sample() -> None:
    """Guards the reference itself: the inputs above must produce every family's samples."""
    names = set(exposition())
    assert {
        "fleetd_gpu_memory_ours_bytes",
        "fleetd_gpu_health",
        "fleetd_gpu_xid_events_total",
        "fleetd_worker_state",
        "fleetd_worker_restarts_total",
        "fleetd_model_availability_ratio",
        "fleetd_model_wanted_seconds_total",
        "fleetd_reconcile_duration_seconds_bucket",
        "fleetd_reconcile_total",
        "fleetd_events_total",
        "fleetd_alert_deliveries_total",
        "fleetd_metrics_events_dropped_total",
    } <= names


@pytest.mark.parametrize(("title", "expr"), ALL_EXPRS)
def test_every_metric_is_exported_by_fleetd(title: str, expr: str) -> None:
    used = set(METRIC.findall(expr))
    assert used, f"{title}: no fleetd metric in {expr}"
    missing = used - set(exposition())
    assert not missing, f"{title}: {sorted(missing)} are not in fleetd's exposition"


@pytest.mark.parametrize(("title", "expr"), ALL_EXPRS)
def test_selectors_only_name_labels_the_metric_has(title: str, expr: str) -> None:
    for name, matchers in SELECTOR.findall(strip_strings(expr)):
        for label in MATCHER.findall(matchers):
            assert label in metric_labels(name), f"{title}: {name} has no label {label!r}"


@pytest.mark.parametrize(("title", "expr"), ALL_EXPRS)
def test_grouping_labels_exist(title: str, expr: str) -> None:
    available = set[str]().union(*(metric_labels(n) for n in METRIC.findall(expr)))
    for group in GROUPING.findall(expr):
        for label in filter(None, (part.strip() for part in group.split(","))):
            assert label in available, f"{title}: grouping by unknown label {label!r}"


def test_legends_only_name_labels_the_query_has() -> None:
    for panel in panels():
        for target in panel.get("targets", []):
            available = set[str]().union(
                *(metric_labels(n) for n in METRIC.findall(target["expr"]))
            )
            for label in LEGEND_LABEL.findall(target.get("legendFormat", "")):
                assert label in available, f"{panel['title']}: legend names {label!r}"


@pytest.mark.parametrize(("title", "expr"), ALL_EXPRS)
def test_counters_go_through_rate_or_increase_and_gauges_do_not(title: str, expr: str) -> None:
    for match in METRIC.finditer(expr):
        name, function = match.group(), enclosing_function(expr, match.start())
        if function == "label_values":
            continue
        if counter_like(name):
            assert function in COUNTER_FUNCTIONS, f"{title}: counter {name} used raw in {expr}"
        else:
            assert function not in COUNTER_FUNCTIONS, f"{title}: {function}() of gauge {name}"


def test_quantiles_come_from_buckets() -> None:
    for title, expr in ALL_EXPRS:
        if "histogram_quantile" in expr:
            assert re.search(r"rate\(\w+_bucket\b", expr), title
            assert re.search(r"by \([^)]*\ble\b", expr), f"{title}: aggregation drops le"


def expected_unit(expr: str) -> str | None:
    """The unit a panel showing ``expr`` must have, where the metric's name decides it."""
    if "histogram_quantile" in expr:
        return "s"
    names = METRIC.findall(expr)
    if "/" in strip_strings(expr):
        if len(names) == 2 and names[0].endswith(("_bytes", "_seconds_total")):
            return "percentunit"  # same unit over same unit
        return None
    if not names or any(counter_like(n) for n in names):
        return None
    for suffix, unit in (
        ("_bytes", "bytes"),
        ("_ratio", "percentunit"),
        ("_seconds", "s"),
        ("_celsius", "celsius"),
        ("_watts", "watt"),
    ):
        if all(n.endswith(suffix) for n in names):
            return unit
    return None


def test_units_follow_the_metric_names() -> None:
    checked = 0
    for panel in panels():
        targets = panel.get("targets", [])
        if not targets:
            continue
        want = expected_unit(targets[0]["expr"])  # later queries may be thresholds (targets)
        if want is not None:
            assert panel["fieldConfig"]["defaults"].get("unit") == want, panel["title"]
            checked += 1
    assert checked >= 10


def test_the_dashboard_covers_fleetds_metrics() -> None:
    """Every family fleetd exports is on some panel (the point of a fleetd dashboard)."""
    used = {name for _, expr in ALL_EXPRS for name in METRIC.findall(expr)}
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", n) for n in exposition()}
    covered = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    # fleetd_gpu_memory_used_bytes is ours + foreign, which the memory panel stacks
    assert families - covered <= {"fleetd_gpu_memory_used_bytes"}
