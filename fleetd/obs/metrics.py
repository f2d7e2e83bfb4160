"""Every fleetd Prometheus metric, defined here, in one registry that belongs to ``FleetMetrics``.

Three sources feed it, and nothing here acts on the fleet:

* **Snapshots.** ``refresh(view)`` reads the reconciler (GPUs, plan, workers) on every scrape;
  the GPU, worker and replica gauges are built from the latest one by a custom collector, so a
  worker or GPU that is gone leaves no stale series behind.
* **Events.** ``follow_events(bus, metrics)`` feeds every bus event to ``observe_event``:
  counters (events by kind, XIDs, restarts by reason, failed reconcile passes) and the
  availability integral.
* **Calls.** ``observe_reconcile(seconds, ok=...)`` from the reconciler after each pass, and
  ``count_alert(hook, result)`` from the alert hooks.

Restart reasons (``fleetd_worker_restarts_total{reason}``): ``worker.crashed`` counts one
restart (the supervisor emits it only when it will start the worker again, not when the crash
loop makes it FAILED); its reason is ``hang`` when a ``worker.hung`` came first or the message
says ": hung:", ``start_timeout`` when the message names ``start_timeout_s``, else ``exit``.
``operator.restart`` (fleetctl restart) counts ``operator``. Planned stops (scale down, move,
preemption, respec) are not restarts.

Availability (``fleetd_model_availability_ratio``): a model is *wanted* while the plan wants
at least one replica of it (or, before the first plan, once a worker of it exists) and
*available* while at least one replica is READY. Both are integrated over time on the injected
monotonic clock at every state change (events, which also read the reconciler's current plan)
and every scrape (snapshots, which also repair a missed event); the ratio is available time /
wanted time over the daemon's life, so it includes the first load. The two
``..._seconds_total`` counters let Prometheus compute windowed availability with ``rate()``.

Units are base units: bytes (MiB * 2**20) and seconds. The clock must be the reconciler's
(``LoopClock``: ``loop.time()``, which is ``time.monotonic()`` on the default loop), because
``WorkerStatus.since_s`` is read on it.
"""

from __future__ import annotations

import collections
import enum
import errno
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from fleetd.errors import FleetdError
from fleetd.model.gpu import GpuHealth
from fleetd.model.units import MIB
from fleetd.model.worker import WorkerState

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

    from prometheus_client.metrics_core import Metric

    from fleetd.model.gpu import HostSnapshot
    from fleetd.model.worker import WorkerStatus
    from fleetd.obs.events import Event, EventBus
    from fleetd.planning.types import Plan

# The text format Prometheus asks for; prometheus_client >= 0.22 calls 1.0.0 "latest", but
# every fleetd name is a legacy-valid one and 0.0.4 is what every scraper understands.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

RECONCILE_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_GPU_LABELS = ("gpu", "uuid", "name")
_WORKER_LABELS = ("worker", "engine", "gpu", "model")
_NO_PROCESS_STATES = frozenset({WorkerState.STOPPED, WorkerState.BACKOFF, WorkerState.FAILED})


class RestartReason(enum.StrEnum):
    """Why a worker was started again (see the module docstring for how each is derived)."""

    EXIT = "exit"
    HANG = "hang"
    START_TIMEOUT = "start_timeout"
    OPERATOR = "operator"


class ReconcilerView(Protocol):
    """What metrics read from the reconciler (``fleetd.reconciler.Reconciler`` fits)."""

    @property
    def host(self) -> HostSnapshot | None:
        """The last GPU snapshot."""
        ...

    @property
    def plan(self) -> Plan | None:
        """The last plan."""
        ...

    @property
    def vram_mib(self) -> Mapping[str, int]:
        """Measured VRAM per worker name (vLLM workers, last pass)."""
        ...

    @property
    def passes(self) -> int:
        """Completed reconcile passes."""
        ...

    def workers(self) -> Sequence[WorkerStatus]:
        """Every worker and Ollama model slot."""
        ...

    def our_pids(self) -> Mapping[int, str]:
        """Pids of our engines' process trees."""
        ...


class MetricsServerError(FleetdError):
    """The /metrics endpoint cannot listen (its port is taken, or the address is wrong)."""


@dataclass(frozen=True, slots=True)
class _WorkerInfo:
    engine: str
    gpu: str
    model: str


def _model_of(worker: str) -> str:
    """A worker's model from its name, for events before the first scrape.

    vLLM workers and Ollama slots are named ``model`` or ``model#replica``; Ollama servers
    (``ollama@gpu0``) serve no model of their own. ``#`` and ``@`` never occur in model names.
    """
    return "" if "@" in worker else worker.partition("#")[0]


@dataclass(slots=True)
class _Availability:
    """Wanted and available time of one model, integrated piecewise between observations."""

    since: float
    wanted: bool
    ready: set[str] = field(default_factory=set)
    wanted_s: float = 0.0
    available_s: float = 0.0

    def totals(self, now: float) -> tuple[float, float]:
        """(wanted_s, available_s) up to ``now``."""
        dt = max(0.0, now - self.since) if self.wanted else 0.0
        return self.wanted_s + dt, self.available_s + (dt if self.ready else 0.0)

    def advance(self, now: float) -> None:
        self.wanted_s, self.available_s = self.totals(now)
        self.since = max(self.since, now)

    def ratio(self, now: float) -> float:
        wanted_s, available_s = self.totals(now)
        if wanted_s <= 0:
            return 1.0 if self.ready else 0.0
        return min(1.0, available_s / wanted_s)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    host: HostSnapshot | None = None
    plan: Plan | None = None
    workers: tuple[WorkerStatus, ...] = ()
    ours: frozenset[int] = frozenset()
    vram_mib: Mapping[str, int] = field(default_factory=dict)
    passes: int = 0


class FleetMetrics:
    """fleetd's metrics and their registry. Use from the event loop thread only."""

    def __init__(
        self, *, clock: Callable[[], float] | None = None, availability_target: float = 0.999
    ) -> None:
        self._clock = clock or time.monotonic
        self._target = availability_target
        self.registry = CollectorRegistry()
        self._events = Counter(
            "fleetd_events", "Events published on fleetd's bus.", ["kind"], registry=self.registry
        )
        self._alerts = Counter(
            "fleetd_alert_deliveries",
            "Alert hook deliveries by hook name and result.",
            ["hook", "result"],
            registry=self.registry,
        )
        self._reconcile_s = Histogram(
            "fleetd_reconcile_duration_seconds",
            "Duration of reconcile passes (observe, plan, act), by result.",
            ["result"],
            buckets=RECONCILE_BUCKETS_S,
            registry=self.registry,
        )
        for result in ("ok", "error"):
            self._reconcile_s.labels(result=result)
        self._snap = _Snapshot()
        self._info: dict[str, _WorkerInfo] = {}
        self._gpus: dict[str, tuple[str, str]] = {}  # uuid -> (index, name), once seen
        self._restarts: collections.Counter[tuple[str, RestartReason]] = collections.Counter()
        self._hung: set[str] = set()
        self._xids: collections.Counter[tuple[str, str]] = collections.Counter()
        self._reconcile_errors = 0
        self._event_vram_mib: dict[str, int] = {}
        self._avail: dict[str, _Availability] = {}
        self._dropped: Callable[[], int] = lambda: 0
        self._gateway: Callable[[], GatewayCounters] | None = None
        self._view: ReconcilerView | None = None
        self.registry.register(_Collector(self))

    # -- inputs ---------------------------------------------------------------------------
    def observe_reconcile(self, seconds: float, *, ok: bool) -> None:
        """Record one reconcile pass's duration (the reconciler calls this after each pass)."""
        self._reconcile_s.labels(result="ok" if ok else "error").observe(seconds)

    def count_alert(self, hook: str, result: str) -> None:
        """Count one alert delivery attempt (``result``: e.g. ``ok``, ``error``, ``timeout``)."""
        self._alerts.labels(hook=hook, result=result).inc()

    def init_alert_series(self, hooks: Iterable[str], results: Iterable[str]) -> None:
        """Create every (hook, result) series at 0, so rate() and absent() work from the start.

        The daemon passes ``AlertDispatcher.hook_labels`` and the values of ``alerts.Outcome``.
        """
        for hook, result in itertools.product(hooks, tuple(results)):
            self._alerts.labels(hook=hook, result=result)

    def track_gateway(self, stats: Callable[[], GatewayCounters]) -> None:
        """Export the gateway's counters (read at each scrape)."""
        self._gateway = stats

    def track_dropped(self, dropped: Callable[[], int]) -> None:
        """Report events the metrics subscription dropped (its queue overflowed)."""
        self._dropped = dropped

    def observe_event(self, event: Event) -> None:
        """Update counters and availability from one bus event."""
        self._events.labels(kind=event.kind).inc()
        fields = event.fields
        worker = fields.get("worker")
        match event.kind:
            case "worker.state_changed" if isinstance(worker, str):
                self._on_state_changed(worker, fields)
            case "worker.hung" if isinstance(worker, str):
                self._hung.add(worker)
            case "worker.crashed" if isinstance(worker, str):
                self._restarts[(worker, self._crash_reason(worker, event.message))] += 1
            case "operator.restart" if isinstance(worker, str):
                self._restarts[(worker, RestartReason.OPERATOR)] += 1
            case "worker.over_budget" if isinstance(worker, str):
                used = fields.get("used_mib", fields.get("vram_mib"))
                if isinstance(used, int):
                    self._event_vram_mib[worker] = used
            case "gpu.xid":
                uuid, xid = fields.get("gpu_uuid"), fields.get("xid")
                if isinstance(uuid, str):
                    self._xids[(uuid, "" if xid is None else str(xid))] += 1
            case "reconcile.error":
                self._reconcile_errors += 1
            case _:
                pass

    def refresh(self, view: ReconcilerView) -> None:
        """Take a snapshot of the reconciler (on every scrape) and bring availability up to now."""
        now = self._clock()
        self._view = view  # events consult its live plan: is the model wanted right now?
        host, plan, workers = view.host, view.plan, tuple(view.workers())
        self._snap = _Snapshot(
            host, plan, workers, frozenset(view.our_pids()), dict(view.vram_mib), view.passes
        )
        for gpu in host.gpus if host is not None else ():
            self._gpus[gpu.uuid] = (str(gpu.index), gpu.name)
        ready: dict[str, set[str]] = collections.defaultdict(set)
        for w in workers:
            self._info[w.name] = _WorkerInfo(w.engine, str(w.gpu_index), ",".join(w.models))
            if w.state is WorkerState.READY:
                for model in w.models:
                    ready[model].add(w.name)
        # before the first plan, a model with a worker counts as wanted; after it, the plan says
        wanted = _wanted(plan) if plan is not None else {m: 1 for w in workers for m in w.models}
        for model in set(self._avail) | set(wanted):
            track = self._avail.get(model)
            if track is None:
                track = self._avail[model] = _Availability(since=now, wanted=True)
            track.advance(now)
            track.wanted = wanted.get(model, 0) > 0 or (plan is None and track.wanted)
            track.ready = ready.get(model, set())

    def render(self) -> bytes:
        """The registry in the Prometheus text format (0.0.4)."""
        return generate_latest(self.registry)

    # -- event handling -------------------------------------------------------------------
    def _on_state_changed(self, worker: str, fields: Mapping[str, object]) -> None:
        old = self._info.get(worker)
        engine, gpu = fields.get("engine"), fields.get("gpu")
        self._info[worker] = _WorkerInfo(
            engine if isinstance(engine, str) else (old.engine if old else ""),
            str(gpu) if isinstance(gpu, int) else (old.gpu if old else ""),
            old.model if old else _model_of(worker),
        )
        vram = fields.get("vram_mib")
        if isinstance(vram, int):
            self._event_vram_mib[worker] = vram
        try:
            new = WorkerState(str(fields.get("new")))
        except ValueError:
            return
        if new is not WorkerState.BACKOFF and new is not WorkerState.STOPPING:
            self._hung.discard(worker)  # a hang is followed by STOPPING, BACKOFF, crashed
        model = self._info[worker].model
        plan = self._view.plan if self._view is not None else None
        wanted = plan is None or model in _wanted(plan)  # no plan yet: a worker means wanted
        track = self._avail.get(model)
        if not model or (track is None and not wanted):
            return
        now = self._clock()
        if track is None:
            track = self._avail[model] = _Availability(since=now, wanted=True)
        track.advance(now)
        if plan is not None:
            track.wanted = wanted
        if new is WorkerState.READY:
            track.ready.add(worker)
        else:
            track.ready.discard(worker)

    def _crash_reason(self, worker: str, message: str) -> RestartReason:
        if worker in self._hung or ": hung:" in message:
            self._hung.discard(worker)
            return RestartReason.HANG
        if "start_timeout_s=" in message:
            return RestartReason.START_TIMEOUT
        return RestartReason.EXIT

    # -- collection -----------------------------------------------------------------------
    def _worker_labels(self, worker: str) -> list[str]:
        info = self._info.get(worker) or _WorkerInfo("", "", _model_of(worker))
        return [worker, info.engine, info.gpu, info.model]

    def _collect(self) -> Iterator[Metric]:
        now = self._clock()
        yield from self._gpu_families()
        yield from self._worker_families(now)
        yield from self._model_families(now)
        total = CounterMetricFamily(
            "fleetd_reconcile", "Reconcile passes by result.", labels=["result"]
        )
        total.add_metric(["ok"], self._snap.passes)
        total.add_metric(["error"], self._reconcile_errors)
        yield total
        if self._gateway is not None:
            yield from _gateway_families(self._gateway())
        yield CounterMetricFamily(
            "fleetd_metrics_events_dropped",
            "Events the metrics subscription dropped: event-derived counters undercount by this.",
            value=self._dropped(),
        )

    def _gpu_families(self) -> Iterator[Metric]:
        def gauge(name: str, doc: str, extra: Sequence[str] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=[*_GPU_LABELS, *extra])

        mem = {
            kind: gauge(f"fleetd_gpu_memory_{kind}_bytes", doc)
            for kind, doc in (
                ("total", "GPU memory in total."),
                ("reserved", "GPU memory the driver reserves (not usable)."),
                ("used", "GPU memory in use (excluding the driver's reservation)."),
                ("ours", "GPU memory held by fleetd's workers."),
                ("foreign", "GPU memory in use by anything but fleetd's workers."),
                ("free", "GPU memory free."),
            )
        }
        util = gauge("fleetd_gpu_utilization_ratio", "GPU utilization (0-1).")
        temp = gauge("fleetd_gpu_temperature_celsius", "GPU temperature.")
        power = gauge("fleetd_gpu_power_watts", "GPU power draw.")
        health = gauge("fleetd_gpu_health", "GPU health: 1 for the current state.", ["state"])
        host = self._snap.host
        for gpu in host.gpus if host is not None else ():
            labels = [str(gpu.index), gpu.uuid, gpu.name]
            ours_mib = sum(p.used_mib or 0 for p in gpu.processes if p.pid in self._snap.ours)
            for kind, mib in (
                ("total", gpu.total_mib),
                ("reserved", gpu.reserved_mib),
                ("used", gpu.used_mib),
                ("ours", ours_mib),
                ("foreign", max(0, gpu.used_mib - ours_mib)),
                ("free", gpu.free_mib),
            ):
                mem[kind].add_metric(labels, mib * MIB)
            if gpu.utilization_pct is not None:
                util.add_metric(labels, gpu.utilization_pct / 100)
            if gpu.temperature_c is not None:
                temp.add_metric(labels, gpu.temperature_c)
            if gpu.power_w is not None:
                power.add_metric(labels, gpu.power_w)
            for state in GpuHealth:
                health.add_metric([*labels, state.value], float(gpu.health is state))
        xids = CounterMetricFamily(
            "fleetd_gpu_xid_events", "XID errors the driver reported.", labels=[*_GPU_LABELS, "xid"]
        )
        for (uuid, xid), count in sorted(self._xids.items()):
            index, name = self._gpus.get(uuid, ("", ""))
            xids.add_metric([index, uuid, name, xid], count)
        yield from (*mem.values(), util, temp, power, health, xids)

    def _worker_families(self, now: float) -> Iterator[Metric]:
        def gauge(name: str, doc: str, extra: Sequence[str] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=[*_WORKER_LABELS, *extra])

        state = gauge("fleetd_worker_state", "Worker state: 1 for the current one.", ["state"])
        vram = gauge("fleetd_worker_vram_bytes", "GPU memory the worker's processes hold.")
        budget = gauge("fleetd_worker_vram_budget_bytes", "GPU memory budget of the worker.")
        ready_s = gauge(
            "fleetd_worker_ready_seconds", "Time in READY since it last became ready (else 0)."
        )
        for w in self._snap.workers:
            labels = self._worker_labels(w.name)
            for s in WorkerState:
                state.add_metric([*labels, s.value], float(w.state is s))
            held = self._snap.vram_mib.get(w.name, self._event_vram_mib.get(w.name))
            if w.state in _NO_PROCESS_STATES:
                held = 0  # the reconciler keeps the last reading of a worker that has exited
            if held is not None:
                vram.add_metric(labels, held * MIB)
            budget.add_metric(labels, w.budget_mib * MIB)
            in_ready = max(0.0, now - w.since_s) if w.state is WorkerState.READY else 0.0
            ready_s.add_metric(labels, in_ready)
        restarts = CounterMetricFamily(
            "fleetd_worker_restarts",
            "Worker restarts by reason: exit, hang, start_timeout, operator.",
            labels=[*_WORKER_LABELS, "reason"],
        )
        names = sorted({w.name for w in self._snap.workers} | {n for n, _ in self._restarts})
        for name in names:
            for reason in RestartReason:
                restarts.add_metric(
                    [*self._worker_labels(name), reason.value], self._restarts[(name, reason)]
                )
        yield from (state, vram, budget, ready_s, restarts)

    def _model_families(self, now: float) -> Iterator[Metric]:
        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["model"])

        ready = gauge("fleetd_model_replicas_ready", "Replicas READY.")
        wanted = gauge("fleetd_model_replicas_wanted", "Replicas wanted (config and overrides).")
        pending = gauge("fleetd_model_replicas_pending", "Wanted replicas the plan cannot place.")
        ratio = gauge(
            "fleetd_model_availability_ratio",
            "Share of the time the model was wanted during which a replica was READY.",
        )
        target = gauge("fleetd_model_availability_target", "Availability objective.")
        wanted_s = CounterMetricFamily(
            "fleetd_model_wanted_seconds", "Time the model was wanted.", labels=["model"]
        )
        available_s = CounterMetricFamily(
            "fleetd_model_available_seconds",
            "Time the model was wanted and had a READY replica.",
            labels=["model"],
        )
        plan = self._snap.plan
        want = _wanted(plan) if plan is not None else {}
        for model in sorted(self._avail):
            track = self._avail[model]
            n_ready = sum(
                1 for w in self._snap.workers if w.state is WorkerState.READY and model in w.models
            )
            ready.add_metric([model], n_ready)
            wanted.add_metric([model], want.get(model, 0))
            n_pending = sum(1 for p in plan.pending if p.model == model) if plan else 0
            pending.add_metric([model], n_pending)
            ratio.add_metric([model], track.ratio(now))
            target.add_metric([model], self._target)
            total_wanted_s, total_available_s = track.totals(now)
            wanted_s.add_metric([model], total_wanted_s)
            available_s.add_metric([model], total_available_s)
        yield from (ready, wanted, pending, ratio, target, wanted_s, available_s)


@dataclass(frozen=True, slots=True)
class GatewayCounters:
    """What the gateway counts, for the exporter (fleetd.gateway.server.Stats, read-only)."""

    requests: int
    in_flight: int
    by_status: Mapping[int, int]
    problems: Mapping[str, int]  # retry, fallback, refused, upstream_failed, ...


def _gateway_families(c: GatewayCounters) -> Iterator[Metric]:
    requests = CounterMetricFamily(
        "fleetd_gateway_responses",
        "Gateway responses by HTTP status (streams: the status they started with).",
        labels=["code"],
    )
    for code, n in sorted(c.by_status.items()):
        requests.add_metric([str(code)], n)
    yield requests
    problems = CounterMetricFamily(
        "fleetd_gateway_problems",
        "Gateway requests that needed a retry or a fallback, were refused, failed upstream, "
        "were cut mid-stream by an engine's death, or lost their client.",
        labels=["kind"],
    )
    for kind, n in sorted(c.problems.items()):
        problems.add_metric([kind], n)
    yield problems
    yield GaugeMetricFamily(
        "fleetd_gateway_in_flight", "Requests the gateway has in flight now.", value=c.in_flight
    )


class _Collector:
    """Adapts ``FleetMetrics`` snapshots to prometheus_client's collector protocol."""

    def __init__(self, metrics: FleetMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics._collect()  # noqa: SLF001 - the collector is part of FleetMetrics


def _wanted(plan: Plan) -> dict[str, int]:
    """Replicas wanted per model: those placed plus those pending."""
    out = collections.Counter(p.model for p in plan.placements)
    out.update(p.model for p in plan.pending)
    return dict(out)


class MetricsServer:
    """Serves ``GET /metrics`` over TCP, refreshing from the reconciler on each scrape."""

    def __init__(
        self, metrics: FleetMetrics, view: ReconcilerView, *, host: str, port: int
    ) -> None:
        self._metrics = metrics
        self._view = view
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        """The port listened on (the configured one, or the one picked for port 0)."""
        if self._runner is not None and self._runner.addresses:
            return int(self._runner.addresses[0][1])
        return self._port

    async def _scrape(self, request: web.Request) -> web.Response:
        del request
        self._metrics.refresh(self._view)
        return web.Response(body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def start(self) -> None:
        """Listen; MetricsServerError (naming the port and the config key) when it cannot."""
        self._metrics.refresh(self._view)  # from now on, events see the reconciler's live plan
        app = web.Application()
        app.router.add_get("/metrics", self._scrape)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, self._port).start()
        except OSError as exc:
            await runner.cleanup()
            hint = (
                "is another fleetd or exporter listening there? Stop it, or choose another "
                "port with `[metrics] port`"
                if exc.errno == errno.EADDRINUSE
                else "check `[metrics] host` and `[metrics] port`"
            )
            raise MetricsServerError(
                f"cannot serve metrics on {self._host}:{self._port} "
                f"(port {self._port}): {exc.strerror or exc}; {hint} in fleetd.toml "
                "(or set `[metrics] enabled = false`)"
            ) from exc
        self._runner = runner

    async def stop(self) -> None:
        """Stop listening (idempotent)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


async def follow_events(bus: EventBus, metrics: FleetMetrics) -> None:
    """Feed every bus event to ``metrics`` until cancelled."""
    sub = bus.subscribe()
    metrics.track_dropped(lambda: sub.dropped)
    try:
        async for event in sub:
            metrics.observe_event(event)
    finally:
        sub.close()
