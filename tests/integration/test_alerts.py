"""Alert hooks against real processes and a real HTTP server on loopback."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import json
import re
import socket
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from fleetd.config import AlertHook, AlertsSpec
from fleetd.obs import alerts
from fleetd.obs.events import EventBus
from fleetd.testing import ManualClock

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
async def _no_leftover_tasks() -> AsyncIterator[None]:
    """Every delivery task and server handler is gone when a test ends."""
    before = asyncio.all_tasks()
    yield
    me = asyncio.current_task()
    leftover = [t for t in asyncio.all_tasks() - before if t is not me and not t.done()]
    assert not leftover, f"tasks left running: {leftover}"


class Outcomes:
    """Records on_delivery calls; tests wait on counts, never on sleeps."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self._changed = asyncio.Event()

    def __call__(self, label: str, result: str) -> None:
        self.seen.append((label, result))
        self._changed.set()

    def results(self) -> collections.Counter[str]:
        return collections.Counter(result for _, result in self.seen)

    async def wait(self, count: int, *, timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.seen) < count:
                self._changed.clear()
                await self._changed.wait()


@dataclass
class Harness:
    bus: EventBus
    dispatcher: alerts.AlertDispatcher
    outcomes: Outcomes


@pytest.fixture
async def start() -> AsyncIterator[Callable[..., Harness]]:
    """Start dispatchers on fresh buses; cancel and close them all at the end."""
    running: list[tuple[alerts.AlertDispatcher, asyncio.Task[None]]] = []

    def _start(spec: AlertsSpec, *, clock: Callable[[], float] | None = None) -> Harness:
        bus = EventBus()
        outcomes = Outcomes()
        dispatcher = alerts.AlertDispatcher(spec, bus, clock=clock, on_delivery=outcomes)
        running.append((dispatcher, asyncio.create_task(dispatcher.run(), name="alerts")))
        return Harness(bus, dispatcher, outcomes)

    yield _start
    for dispatcher, task in running:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await dispatcher.aclose()


@dataclass
class Receiver:
    """A webhook receiver: /ok answers 200, /flaky 500 twice then 200, /fail 503, /hang waits."""

    base: str = ""
    bodies: list[tuple[str, Any]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    content_types: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append((request.path_qs, await request.json()))
        self.arrivals.append(time.monotonic())
        self.content_types.append(request.content_type)
        self.arrived.set()
        match request.path:
            case "/flaky":
                flaky = [p for p, _ in self.bodies if p.startswith("/flaky")]
                return web.Response(status=200 if len(flaky) > 2 else 500)
            case "/fail":
                return web.Response(status=503, text="maintenance")
            case "/hang":
                await self.release.wait()
            case _:
                pass
        return web.Response(status=200)

    def count(self, path: str) -> int:
        return sum(1 for p, _ in self.bodies if p.startswith(path))

    async def wait_count(self, path: str, count: int) -> None:
        async with asyncio.timeout(10):
            while self.count(path) < count:
                self.arrived.clear()
                await self.arrived.wait()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/{tail:.*}", rec.handle)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rec.base = f"http://127.0.0.1:{port}"
    yield rec
    rec.release.set()
    await runner.cleanup()


def write_hook(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


def webhook(url: str, **kw: Any) -> AlertHook:
    return AlertHook(kind="webhook", target=url, **kw)


def exec_hook(target: str, **kw: Any) -> AlertHook:
    return AlertHook(kind="exec", target=target, **kw)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- exec hooks -------------------------------------------------------------------------------


async def test_exec_hook_gets_event_json_on_stdin_and_only_facts_in_env(
    tmp_path: Path, start: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLEETD_TEST_SECRET", "must-not-leak")
    monkeypatch.setenv("LANG", "C.UTF-8")
    monkeypatch.setenv("HOME", str(tmp_path))
    target = write_hook(
        tmp_path / "record.sh",
        f"""\
        cat > "{tmp_path}/stdin.json"
        env -0 > "{tmp_path}/env.bin"
        """,
    )
    h = start(AlertsSpec(hooks=(exec_hook(target, events=("worker.",)),)))
    event = h.bus.emit(
        "worker.failed", "qwen: crash loop", worker="qwen", gpu=1, model="qwen2.5", delay_s=4.0
    )
    await h.outcomes.wait(1)
    assert h.outcomes.seen == [(f"exec:{target}", "ok")]
    assert json.loads((tmp_path / "stdin.json").read_text()) == event.to_json()
    raw = (tmp_path / "env.bin").read_bytes().decode().split("\0")
    env = dict(item.split("=", 1) for item in raw if item)
    for added_by_sh in ("PWD", "OLDPWD", "SHLVL", "_"):
        env.pop(added_by_sh, None)
    assert env.pop("PATH")
    assert env == {
        "LANG": "C.UTF-8",
        "HOME": str(tmp_path),
        "FLEETD_EVENT_KIND": "worker.failed",
        "FLEETD_EVENT_MESSAGE": "qwen: crash loop",
        "FLEETD_EVENT_SEQ": str(event.seq),
        "FLEETD_EVENT_SEVERITY": "critical",
        "FLEETD_WORKER": "qwen",
        "FLEETD_GPU": "1",
        "FLEETD_MODEL": "qwen2.5",
    }


async def test_exec_nonzero_exit_is_a_failure_with_its_output_in_the_log(
    tmp_path: Path, start: Callable[..., Harness]
) -> None:
    target = write_hook(tmp_path / "fail.sh", "echo 'smtp: connection refused' >&2\nexit 3\n")
    h = start(AlertsSpec(hooks=(exec_hook(target, retries=0),)))
    with capture_logs() as logs:
        h.bus.emit("gpu.lost", "GPU-1 fell off the bus", gpu_uuid="GPU-1")
        await h.outcomes.wait(1)
    assert h.outcomes.results() == {"failed": 1}
    [failure] = [e for e in logs if e["event"] == "alerts.delivery_failed"]
    assert failure["log_level"] == "warning"
    assert failure["hook"] == f"exec:{target}"
    assert failure["reason"] == "exit 3: smtp: connection refused"


async def test_exec_timeout_kills_the_whole_process_group(
    tmp_path: Path, start: Callable[..., Harness]
) -> None:
    target = write_hook(
        tmp_path / "hang.sh",
        f"""\
        echo $$ > "{tmp_path}/leader.pid"
        sleep 60 &
        echo $! > "{tmp_path}/child.pid"
        wait
        """,
    )
    h = start(AlertsSpec(hooks=(exec_hook(target, timeout_s=0.5, retries=0),)))
    began = time.monotonic()
    with capture_logs() as logs:
        h.bus.emit("worker.hung", "w: no answer", worker="w")
        await h.outcomes.wait(1)
    assert time.monotonic() - began < 5
    assert h.outcomes.results() == {"failed": 1}
    [failure] = [e for e in logs if e["event"] == "alerts.delivery_failed"]
    assert failure["reason"].startswith("timed out after 0.5 s")
    pids = [int((tmp_path / f"{name}.pid").read_text()) for name in ("leader", "child")]
    procs = [psutil.Process(pid) for pid in pids if not gone(pid)]
    psutil.wait_procs(procs, timeout=5)  # the orphaned child is reaped by init, not by us
    assert all(gone(pid) for pid in pids)


# -- webhooks ---------------------------------------------------------------------------------


async def test_webhook_json_posts_the_event(
    receiver: Receiver, start: Callable[..., Harness]
) -> None:
    h = start(AlertsSpec(hooks=(webhook(f"{receiver.base}/ok?token=secret"),)))
    event = h.bus.emit("worker.crashed", "w: exit 1", worker="w", delay_s=2.0)
    await h.outcomes.wait(1)
    # the label keeps the URL's secret parts (path, query) out of logs and metrics
    assert h.outcomes.seen == [(f"webhook:{receiver.base}", "ok")]
    assert receiver.bodies == [("/ok?token=secret", event.to_json())]
    assert receiver.content_types == ["application/json"]


async def test_webhook_alertmanager_format_is_a_v2_alert_list(
    receiver: Receiver, start: Callable[..., Harness]
) -> None:
    hook = webhook(f"{receiver.base}/api/v2/alerts", format="alertmanager")
    h = start(AlertsSpec(hooks=(hook,)))
    lost = h.bus.emit("gpu.lost", "gpu1 is lost: Xid 79", gpu=1, gpu_uuid="GPU-abc", xid=79)
    crashed = h.bus.emit("worker.crashed", "coder: exit 137", worker="coder", model="deepcoder")
    await h.outcomes.wait(2)
    assert h.outcomes.results() == {"ok": 2}
    [(_, first)], [(_, second)] = ([b] for b in receiver.bodies)
    assert first == [
        {
            "labels": {
                "alertname": "FleetdGpuLost",
                "severity": "critical",
                "kind": "gpu.lost",
                "instance": socket.gethostname(),
                "gpu": "1",
                "gpu_uuid": "GPU-abc",
            },
            "annotations": {
                "summary": "gpu1 is lost: Xid 79",
                "description": first[0]["annotations"]["description"],
            },
            "startsAt": first[0]["startsAt"],
            "generatorURL": "",
        }
    ]
    assert "xid=79" in first[0]["annotations"]["description"]
    assert second[0]["labels"]["alertname"] == "FleetdWorkerCrashed"
    assert second[0]["labels"]["severity"] == "warning"
    assert second[0]["labels"]["worker"] == "coder"
    assert second[0]["labels"]["model"] == "deepcoder"
    for body, event in ((first, lost), (second, crashed)):
        alert = body[0]
        # Alertmanager: label names match the legacy charset; every value is a string
        assert all(re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", k) for k in alert["labels"])
        assert all(
            isinstance(v, str) for v in [*alert["labels"].values(), *alert["annotations"].values()]
        )
        assert alert["startsAt"].endswith("Z")  # RFC 3339, UTC
        starts = dt.datetime.fromisoformat(alert["startsAt"])
        assert abs(starts.timestamp() - event.ts) < 0.001


async def test_retries_back_off_until_the_receiver_recovers(
    receiver: Receiver, start: Callable[..., Harness]
) -> None:
    hook = webhook(f"{receiver.base}/flaky", retries=3, backoff_initial_s=0.1)
    h = start(AlertsSpec(hooks=(hook,)))
    with capture_logs() as logs:
        h.bus.emit("worker.failed", "w failed", worker="w")
        await h.outcomes.wait(1)
    assert h.outcomes.results() == {"ok": 1}
    assert receiver.count("/flaky") == 3  # 500, 500, 200
    first_gap, second_gap = (
        b - a for a, b in zip(receiver.arrivals, receiver.arrivals[1:], strict=False)
    )
    assert first_gap >= 0.09
    assert second_gap >= 0.19  # doubled
    retries = [e for e in logs if e["event"] == "alerts.retrying"]
    assert [(e["attempt"], e["reason"], e["in_s"]) for e in retries] == [
        (1, "HTTP 500", 0.1),
        (2, "HTTP 500", 0.2),
    ]
    assert not [e for e in logs if e["event"] == "alerts.delivery_failed"]


async def test_retries_run_out_and_the_failure_is_logged_and_counted(
    receiver: Receiver, start: Callable[..., Harness]
) -> None:
    hook = webhook(f"{receiver.base}/fail", retries=2, backoff_initial_s=0.01)
    h = start(AlertsSpec(hooks=(hook,)))
    with capture_logs() as logs:
        h.bus.emit("worker.failed", "w failed", worker="w")
        await h.outcomes.wait(1)
    assert h.outcomes.seen == [(f"webhook:{receiver.base}", "failed")]
    assert receiver.count("/fail") == 3
    [failure] = [e for e in logs if e["event"] == "alerts.delivery_failed"]
    assert failure["reason"] == "HTTP 503: maintenance"
    assert failure["attempts"] == 3


async def test_webhook_timeout_bounds_every_attempt(
    receiver: Receiver, start: Callable[..., Harness]
) -> None:
    hook = webhook(f"{receiver.base}/hang", timeout_s=0.2, retries=1, backoff_initial_s=0.01)
    h = start(AlertsSpec(hooks=(hook,)))
    began = time.monotonic()
    with capture_logs() as logs:
        h.bus.emit("worker.failed", "w failed", worker="w")
        await h.outcomes.wait(1)
    assert 0.4 <= time.monotonic() - began < 3
    assert h.outcomes.results() == {"failed": 1}
    assert receiver.count("/hang") == 2
    [failure] = [e for e in logs if e["event"] == "alerts.delivery_failed"]
    assert failure["reason"] == "no answer within 0.2 s"


# -- which events, how often ------------------------------------------------------------------


async def test_hooks_match_exact_kinds_prefixes_and_star_for_problems(
    receiver: Receiver, start: Callable[..., Harness]
) -> None:
    hooks = (
        webhook(f"{receiver.base}/star", events=("*",)),
        webhook(f"{receiver.base}/prefix", events=("worker.",)),
        webhook(f"{receiver.base}/exact", events=("gpu.lost",)),
    )
    h = start(AlertsSpec(hooks=hooks, dedup_window_s=0))
    for kind in ("worker.ready", "worker.failed", "gpu.lost", "daemon.started", "gpu.lost.x"):
        h.bus.emit(kind, kind)
    await h.outcomes.wait(6)
    got = collections.defaultdict(list)
    for path, body in receiver.bodies:
        got[path].append(body["kind"])
    assert {p: sorted(k) for p, k in got.items()} == {
        "/star": ["gpu.lost", "gpu.lost.x", "worker.failed"],
        "/prefix": ["worker.failed", "worker.ready"],
        "/exact": ["gpu.lost"],
    }
    assert len(set(h.dispatcher.hook_labels)) == 3  # same host: labels still tell them apart


async def test_same_kind_and_subject_fire_once_per_dedup_window(
    receiver: Receiver, start: Callable[..., Harness]
) -> None:
    clock = ManualClock()
    h = start(
        AlertsSpec(hooks=(webhook(f"{receiver.base}/ok"),), dedup_window_s=300),
        clock=clock.monotonic,
    )
    h.bus.emit("worker.crashed", "a crashed", worker="a")
    h.bus.emit("worker.crashed", "a crashed again", worker="a")
    h.bus.emit("worker.crashed", "b crashed", worker="b")  # another subject
    h.bus.emit("worker.hung", "a hung", worker="a")  # another kind
    await h.outcomes.wait(4)  # the dispatcher reads the clock when it takes the event
    clock.now += 299
    h.bus.emit("worker.crashed", "a crashed a third time", worker="a")
    await h.outcomes.wait(5)
    clock.now += 2  # 301 s after the first: the window has passed
    h.bus.emit("worker.crashed", "a crashed once more", worker="a")
    await h.outcomes.wait(6)
    assert h.outcomes.results() == {"ok": 4, "dropped_dedup": 2}
    messages = sorted(body["message"] for _, body in receiver.bodies)
    assert messages == ["a crashed", "a crashed once more", "a hung", "b crashed"]


async def test_rate_limit_drops_the_excess_and_warns_once_a_minute(
    receiver: Receiver, start: Callable[..., Harness]
) -> None:
    clock = ManualClock()
    spec = AlertsSpec(hooks=(webhook(f"{receiver.base}/ok"),), dedup_window_s=0, max_per_minute=3)
    h = start(spec, clock=clock.monotonic)
    with capture_logs() as logs:
        for i in range(10):
            h.bus.emit("worker.failed", f"w{i} failed", worker=f"w{i}")
        await h.outcomes.wait(10)
        assert h.outcomes.results() == {"ok": 3, "dropped_rate": 7}
        warnings = [e for e in logs if e["event"] == "alerts.rate_limited"]
        assert len(warnings) == 1
        assert warnings[0]["log_level"] == "warning"
        clock.now += 61  # a rolling minute later the three slots are free again
        for i in range(4):
            h.bus.emit("worker.failed", f"v{i} failed", worker=f"v{i}")
        await h.outcomes.wait(14)
    assert h.outcomes.results() == {"ok": 6, "dropped_rate": 8}
    warnings = [e for e in logs if e["event"] == "alerts.rate_limited"]
    assert len(warnings) == 2
    assert sum(w["dropped"] for w in warnings) == 8
    assert receiver.count("/ok") == 6


# -- the key property: hooks never hold up the bus ---------------------------------------------


async def test_a_thousand_events_while_every_hook_hangs_block_nothing(
    tmp_path: Path, receiver: Receiver, start: Callable[..., Harness]
) -> None:
    hang = write_hook(tmp_path / "hang.sh", "sleep 60 &\nwait\n")
    hooks = (
        exec_hook(hang, timeout_s=300, retries=0),
        webhook(f"{receiver.base}/hang", timeout_s=300, retries=0),
    )
    h = start(AlertsSpec(hooks=hooks, dedup_window_s=0, max_per_minute=10_000))
    began = time.monotonic()
    for i in range(1000):
        h.bus.emit("worker.failed", f"w{i} failed", worker=f"w{i}")
    assert time.monotonic() - began < 1.0  # a behavioural bound, not a benchmark
    busy = 2 * (1000 - alerts.MAX_IN_FLIGHT)
    await h.outcomes.wait(busy)
    assert h.outcomes.results() == {"dropped_busy": busy}
    await receiver.wait_count("/hang", alerts.MAX_IN_FLIGHT)
    # the loop is free: a zero sleep comes straight back while 32 deliveries hang
    began = time.monotonic()
    await asyncio.sleep(0)
    assert time.monotonic() - began < 0.1
    hooks_running = psutil.Process().children(recursive=True)
    assert hooks_running
    began = time.monotonic()
    await h.dispatcher.aclose()
    assert time.monotonic() - began < 5
    assert h.outcomes.results() == {"dropped_busy": busy, "failed": 2 * alerts.MAX_IN_FLIGHT}
    psutil.wait_procs([p for p in hooks_running if not gone(p.pid)], timeout=5)
    assert all(gone(p.pid) for p in hooks_running)


async def test_aclose_with_grace_delivers_events_still_queued(receiver: Receiver) -> None:
    bus = EventBus()
    outcomes = Outcomes()
    spec = AlertsSpec(hooks=(webhook(f"{receiver.base}/ok"),))
    dispatcher = alerts.AlertDispatcher(spec, bus, on_delivery=outcomes)
    # run() is not running, as during shutdown once the task tree is cancelled
    bus.emit("worker.failed", "w: stop timed out", worker="w")
    await dispatcher.aclose(grace_s=5)
    assert outcomes.seen == [(f"webhook:{receiver.base}", "ok")]
    assert receiver.count("/ok") == 1
    bus.emit("worker.failed", "after close", worker="v")  # closed: nothing more goes out
    assert len(outcomes.seen) == 1
