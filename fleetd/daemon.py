"""The composition root: picks implementations, runs the task tree, shuts down in order.

``run_daemon`` is the one place where real or simulated boundaries are chosen (GPU backend,
launcher, engine commands). One asyncio TaskGroup holds the named tasks ``reconciler`` and
``gpu-monitor``; the reconciler owns one task per worker. Signal handlers only record:
SIGTERM/SIGINT ask for a stop (a second one forces it).

Shutdown order: the reconciler stops planning (its task and the workers' owner tasks are
cancelled), the control socket closes, the gateway stops accepting and lets requests in
flight finish (bounded by ``gateway.drain_timeout_s``), then the engines are stopped (or left
running for the next fleetd, with ``daemon.on_exit = "leave"``), then the GPU backend and
the HTTP client close.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from fleetd.api.server import ControlServer, build_app
from fleetd.control import Caller, Control, ControlError
from fleetd.gateway.inflight import Inflight
from fleetd.gateway.server import Gateway, GatewayError
from fleetd.model import xid as xid_catalogue
from fleetd.obs.alerts import AlertDispatcher, Outcome
from fleetd.obs.events import EventBus
from fleetd.obs.metrics import FleetMetrics, MetricsServer, MetricsServerError, follow_events
from fleetd.obs.systemd import Notifier
from fleetd.overrides_store import OverridesStore
from fleetd.reconciler import Paths, Reconciler
from fleetd.runtime.clock import LoopClock
from fleetd.runtime.health import HttpProbe
from fleetd.runtime.launcher import PosixLauncher
from fleetd.state import WorkerRecords

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Mapping
    from typing import Any

    from fleetd.config import FleetConfig
    from fleetd.runtime.gpu import GpuBackend
    from fleetd.runtime.launcher import Launcher

_log = structlog.get_logger("fleetd.daemon")


@dataclass
class Daemon:
    """Handles for whoever drives the daemon (the CLI, tests, the demo banner)."""

    cfg: FleetConfig
    bus: EventBus
    reconciler: Reconciler
    control: Control
    stop_requested: asyncio.Event
    force: asyncio.Event
    alerts: AlertDispatcher
    gateway: Gateway | None = None
    metrics: FleetMetrics | None = None
    metrics_url: str = ""
    reload_requested: asyncio.Event = field(default_factory=asyncio.Event)
    notifier: Notifier = field(default_factory=Notifier)

    def request_stop(self) -> None:
        """Ask for an orderly stop (a second request forces it)."""
        if self.stop_requested.is_set():
            self.force.set()
        self.stop_requested.set()


async def run_daemon(
    cfg: FleetConfig,
    *,
    backend: GpuBackend,
    launcher: Launcher | None = None,
    engine_env: Mapping[str, str] | None = None,
    on_started: Callable[[Daemon], Coroutine[Any, Any, None]] | None = None,
    install_signals: bool = True,
    config_loader: Callable[[], FleetConfig] | None = None,
    config_path: str = "",
) -> int:
    """Run until asked to stop; returns the process exit code."""
    bus = EventBus()
    loop = asyncio.get_running_loop()
    # the same clock as WorkerStatus.since_s (the loop's), so ready time adds up
    metrics = FleetMetrics(clock=loop.time, availability_target=cfg.metrics.availability_target)
    metrics_events = asyncio.ensure_future(follow_events(bus, metrics))  # counts from the start
    # subscribes now, so start-up problems alert too
    alerts = AlertDispatcher(cfg.alerts, bus, on_delivery=metrics.count_alert)
    metrics.init_alert_series(alerts.hook_labels, [o.value for o in Outcome])
    probe = HttpProbe()
    cfg.daemon.state_dir.mkdir(parents=True, exist_ok=True)
    cfg.daemon.log_dir.mkdir(parents=True, exist_ok=True)
    reconciler = Reconciler(
        cfg,
        backend=backend,
        launcher=launcher or PosixLauncher(),
        probe=probe,
        clock=LoopClock(),
        bus=bus,
        paths=Paths(cfg.daemon.log_dir, WorkerRecords(cfg.daemon.state_dir)),
        engine_env=dict(os.environ if engine_env is None else engine_env),
        inflight=Inflight(),
    )
    control = Control(
        reconciler, bus, store=OverridesStore(cfg.daemon.state_dir), load_config=config_loader
    )
    control.restore()
    reconciler.on_gpu_changes = control.gpu_changes
    daemon = Daemon(cfg, bus, reconciler, control, asyncio.Event(), asyncio.Event(), alerts)
    daemon.metrics = metrics
    reconciler.on_pass = lambda seconds, ok: metrics.observe_reconcile(seconds, ok=ok)
    server = ControlServer(build_app(control, bus, config_path=config_path), cfg.control)
    exporter = (
        MetricsServer(metrics, reconciler, host=cfg.metrics.host, port=cfg.metrics.port)
        if cfg.metrics.enabled
        else None
    )
    try:
        await _start_servers(daemon, server, exporter)
    except (ControlError, MetricsServerError, GatewayError) as exc:
        bus.emit("daemon.start_failed", str(exc))
        await server.stop()
        if daemon.gateway is not None:
            await daemon.gateway.stop()
        await _close(alerts, exporter, metrics_events, backend, probe)
        return 1
    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.request_stop)
        loop.add_signal_handler(signal.SIGHUP, daemon.reload_requested.set)
    bus.emit(
        "daemon.started",
        f"fleetd started: {len(cfg.models)} model(s), GPUs via {backend.name}",
        pid=os.getpid(),
    )
    bus.emit("control.listening", f"control socket at {server.path}", path=str(server.path))
    code = await _run_tasks(daemon, backend, on_started)
    daemon.notifier.stopping("stopping: " + summary(daemon))
    await server.stop()  # 1. stop accepting operator commands
    if daemon.gateway is not None:  # 2. no new requests; in-flight ones finish (bounded)
        await daemon.gateway.stop()
    # the config in force now: a reload may have switched on_exit (the upgrade procedure)
    leave = daemon.reconciler.cfg.daemon.on_exit == "leave"
    if not await _shutdown(daemon, leave_running=leave):
        code = 1
    await _close(alerts, exporter, metrics_events, backend, probe)
    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    bus.emit("daemon.stopped", "fleetd stopped", exit_code=code)
    return code


async def _start_servers(
    daemon: Daemon, server: ControlServer, exporter: MetricsServer | None
) -> None:
    """Control socket, gateway, metrics: each raises its own error naming the problem."""
    cfg, bus = daemon.cfg, daemon.bus
    await server.start()
    if cfg.gateway.enabled:
        gateway = Gateway(cfg, daemon.reconciler.replicas, bus, daemon.reconciler.inflight)
        await gateway.start()
        daemon.gateway = gateway
        daemon.control.config_listeners.append(gateway.set_config)
        daemon.control.gateway_status = gateway.status_json
        if daemon.metrics is not None:
            daemon.metrics.track_gateway(gateway.counters)
    if exporter is not None:
        await exporter.start()
        daemon.metrics_url = f"http://{cfg.metrics.host}:{exporter.port}/metrics"
        bus.emit(
            "metrics.listening",
            f"metrics at http://{cfg.metrics.host}:{exporter.port}/metrics",
            port=exporter.port,
        )


async def _close(
    alerts: AlertDispatcher,
    exporter: MetricsServer | None,
    metrics_events: asyncio.Future[None],
    backend: GpuBackend,
    probe: HttpProbe,
) -> None:
    """The last steps of a shutdown, in order (also after a failed start)."""
    await alerts.aclose(grace_s=5.0)  # shutdown-time problems still go out, then the rest stop
    if exporter is not None:
        await exporter.stop()
    metrics_events.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await metrics_events
    await backend.aclose()
    await probe.aclose()


async def _run_tasks(
    daemon: Daemon,
    backend: GpuBackend,
    on_started: Callable[[Daemon], Coroutine[Any, Any, None]] | None,
) -> int:
    """The task tree, until a stop is requested (0) or a core task ends by itself (1)."""
    code = 0
    try:
        async with asyncio.TaskGroup() as tg:
            rec_task = tg.create_task(daemon.reconciler.run(), name="reconciler")
            gpu_task = tg.create_task(
                _gpu_monitor(backend, daemon.bus, daemon.reconciler), name="gpu-monitor"
            )
            stopper = tg.create_task(daemon.stop_requested.wait(), name="stop-wait")
            tasks = [
                rec_task,
                gpu_task,
                stopper,
                tg.create_task(_systemd(daemon), name="systemd"),
                tg.create_task(daemon.notifier.watchdog(lambda: _healthy(daemon)), name="watchdog"),
                tg.create_task(_reloads(daemon), name="reload"),
                tg.create_task(daemon.alerts.run(), name="alerts"),
            ]
            if on_started is not None:
                tasks.append(tg.create_task(on_started(daemon), name="on-started"))
            done, _ = await asyncio.wait(
                {rec_task, gpu_task, stopper}, return_when=asyncio.FIRST_COMPLETED
            )
            if stopper not in done:
                code = 1  # a core task ended on its own: that is a bug, already logged
            for task in tasks:
                task.cancel()
    except* Exception as group:  # noqa: BLE001 - the top of the tree: report, then shut down
        for exc in group.exceptions:
            daemon.bus.emit(
                "daemon.task_failed", f"a daemon task failed: {type(exc).__name__}: {exc}"
            )
        code = 1
    return code


async def _shutdown(daemon: Daemon, *, leave_running: bool) -> bool:
    """Stop (or leave) the engines within a deadline; a second signal cuts it short."""
    daemon.bus.emit(
        "daemon.stopping",
        "stopping: " + ("leaving engines running" if leave_running else "stopping engines"),
    )
    try:
        async with asyncio.timeout(_shutdown_budget_s(daemon.cfg)):
            shutdown = asyncio.ensure_future(
                daemon.reconciler.shutdown(leave_running=leave_running)
            )
            forced = asyncio.ensure_future(daemon.force.wait())
            await asyncio.wait({shutdown, forced}, return_when=asyncio.FIRST_COMPLETED)
            forced.cancel()
            if not shutdown.done():
                shutdown.cancel()
                return False
    except TimeoutError:
        daemon.bus.emit("daemon.shutdown_timeout", "shutdown took too long; exiting anyway")
        return False
    return True


def summary(daemon: Daemon) -> str:
    """One line for `systemctl status`: workers ready, pending, GPU health."""
    rec = daemon.reconciler
    workers = rec.workers()
    ready = sum(1 for w in workers if w.state.value == "ready")
    pending = len(rec.plan.pending) if rec.plan is not None else 0
    gpus = rec.host.gpus if rec.host is not None else ()
    healthy = sum(1 for g in gpus if g.health.value == "healthy")
    return (
        f"{ready}/{len(workers)} workers ready, {pending} pending, "
        f"{healthy}/{len(gpus)} GPUs healthy"
    )


def _healthy(daemon: Daemon) -> bool:
    """The loop runs (we are called) and the reconciler completed a pass recently."""
    last = daemon.reconciler.last_pass_s
    limit = 3 * daemon.cfg.daemon.resync_interval_s + 30
    return last is not None and asyncio.get_running_loop().time() - last < limit


async def _systemd(daemon: Daemon) -> None:
    """READY=1 once the socket is up and the first reconcile pass ran; STATUS= as it goes."""
    rec = daemon.reconciler
    async with rec.passed:
        await rec.passed.wait_for(lambda: rec.passes >= 1)
    daemon.notifier.ready(summary(daemon))
    daemon.bus.emit("daemon.ready", f"ready: {summary(daemon)}")
    while True:
        await asyncio.sleep(5)
        daemon.notifier.status(summary(daemon))


async def _reloads(daemon: Daemon) -> None:
    """SIGHUP: validate and adopt the config file; the running config stays on error."""
    while True:
        await daemon.reload_requested.wait()
        daemon.reload_requested.clear()
        daemon.notifier.reloading()
        try:
            daemon.control.reload(Caller())
        except ControlError as exc:
            daemon.bus.emit("config.reload_refused", f"SIGHUP reload refused: {exc}")
        daemon.notifier.ready(summary(daemon))


def _shutdown_budget_s(cfg: FleetConfig) -> float:
    graces = [m.health.stop_grace_s for m in cfg.models] or [30.0]
    return max(graces) + 30.0


async def _gpu_monitor(backend: GpuBackend, bus: EventBus, reconciler: Reconciler) -> None:
    """Turn driver events into fleetd events, XID actions and reconcile passes.

    Health changes are reported by the reconciler's fault policy (debounced), not here; but
    a GPU whose health changed between passes (a fault without a driver event, e.g. NVML
    timing out) gets a pass at once instead of at the next resync.
    """
    while True:
        events = await backend.wait_events(1.0)
        seen = reconciler.raw_health
        if seen:
            snap = await backend.snapshot()
            if any(seen.get(g.uuid) is not g.health for g in snap.gpus):
                reconciler.kick()
        for event in events:
            bus.emit(
                f"gpu.{event.kind.value}",
                f"GPU {event.uuid}: {event.detail or event.kind.value}",
                gpu_uuid=event.uuid,
                xid=event.xid,
            )
            if event.xid is not None and xid_catalogue.action_for(event.xid) is (
                xid_catalogue.XidAction.RESTART_APP
            ):
                reconciler.restart_on_gpu(event.uuid, event.detail or f"XID {event.xid}")
        if events:
            reconciler.kick()
