"""fleetctl as an operator runs it: a real subprocess against a fake fleetd on a Unix socket.

The fake serves canned ``fleetd.api.schemas`` shapes with aiohttp (as the daemon does) from a
background thread; scripted reactions to POSTs change its status and emit events over time,
so ``--wait`` is exercised end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from fleetd.api.schemas import EventJson, GpuJson, Status, WorkerJson
from fleetd.cli import fleetctl_client

ROOT = Path(__file__).resolve().parents[2]
CLI = (sys.executable, "-m", "fleetd.cli.fleetctl")
Hook = Callable[["FakeFleetd", dict[str, Any]], None]


def gpu(index: int, *, ours: int, foreign: int) -> GpuJson:
    total = 16376
    return {
        "index": index,
        "uuid": f"GPU-{index:08d}-aaaa-bbbb-cccc-000000000000",
        "name": "NVIDIA GeForce RTX 4070 Ti SUPER",
        "health": "healthy",
        "health_reason": "",
        "status": "ok",
        "total_mib": total,
        "used_mib": ours + foreign,
        "ours_mib": ours,
        "foreign_mib": foreign,
        "free_mib": total - ours - foreign,
        "temperature_c": 50 + index,
        "utilization_pct": 30,
        "power_w": 120.5,
        "processes": [],
    }


def worker(name: str, gpu_index: int, **kw: Any) -> WorkerJson:
    model = name.split("#", maxsplit=1)[0]
    base: WorkerJson = {
        "name": name,
        "engine": "vllm",
        "kind": "process",
        "models": [model],
        "gpu": gpu_index,
        "gpu_uuid": f"GPU-{gpu_index:08d}-aaaa-bbbb-cccc-000000000000",
        "state": "ready",
        "reason": "health check passed",
        "since_s": 192.0,
        "uptime_s": 192.0,
        "restarts": 0,
        "port": 8001,
        "in_flight": 0,
        "pid": 4242,
        "vram_mib": 15000,
        "budget_mib": 16384,
    }
    base.update(kw)  # type: ignore[typeddict-item]
    return base


def make_status() -> Status:
    return {
        "version": "0.1.0",
        "pid": 999,
        "uptime_s": 7500.0,
        "backend": "sim",
        "gpus": [gpu(0, ours=15000, foreign=512), gpu(1, ours=9728, foreign=0)],
        "workers": [
            worker("mimo-vl", 0),
            worker("ollama@gpu1", 1, engine="ollama", models=[], port=11434, pid=5151),
            worker("deepcoder:14b", 1, engine="ollama", kind="model", port=11434, pid=5151),
        ],
        "pending": [
            {
                "model": "deepseek-r1:32b",
                "replica": 0,
                "reason": "deepseek-r1:32b needs 5.5 GiB; gpu0 has 0.0 GiB free (mimo-vl "
                "16.0 GiB); gpu1 has 0.1 GiB free (deepcoder:14b 9.5 GiB), 3.0 GiB even after "
                "evicting lower priorities",
            }
        ],
        "overrides": {
            "replicas": {"mimo-vl": 1},
            "cordoned": ["GPU-00000001-aaaa-bbbb-cccc-000000000000"],
            "fault_cordoned": [],
            "drained_gpus": [],
            "drained_models": [],
            "drained_workers": [],
        },
        "config_path": "/etc/fleetd/fleetd.toml",
        "gateway": None,
    }


class FakeFleetd:
    """A canned control API on a Unix socket, served by aiohttp in its own thread and loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.status: Any = make_status()
        self.events: list[EventJson] = []
        self.requests: list[tuple[str, str, Any]] = []
        self.hooks: dict[str, Hook] = {}
        self.status_delay_s = 0.0
        self.raw_status: bytes | None = None
        self.logs = "line 1\nline 2\nline 3\n"
        self._stopping = False
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), name="fake")
        for kind, message in (("daemon.started", "fleetd 0.1.0 started"), ("gpu.seen", "gpu0")):
            self.emit(kind, message)

    # -- test-side API (call before running fleetctl, or from hooks in the server's loop) ----
    def emit(self, kind: str, message: str) -> int:
        seq = len(self.events) + 1
        self.events.append({"seq": seq, "ts": time.time(), "kind": kind, "message": message})
        return seq

    def later(self, delay_s: float, fn: Callable[[], object]) -> None:
        assert self._loop is not None
        self._loop.call_later(delay_s, fn)

    def set_worker(self, name: str, **fields: Any) -> None:
        for w in self.status["workers"]:
            if w["name"] == name:
                w.update(fields)

    def posts(self) -> list[tuple[str, Any]]:
        return [(path, body) for method, path, body in self.requests if method == "POST"]

    def count(self, path: str) -> int:
        return sum(1 for _m, p, _b in self.requests if p == path)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(10), "fake fleetd did not start"

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        assert not self._thread.is_alive()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_get("/v1/status", self._get_status)
        app.router.add_get("/v1/models/{model}/explain", self._explain)
        app.router.add_get("/v1/events", self._get_events)
        app.router.add_get("/v1/workers/{worker}/logs", self._get_logs)
        app.router.add_post("/v1/{tail:.*}", self._post)
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1)
        await runner.setup()
        await web.UnixSite(runner, str(self.path)).start()
        self._ready.set()
        await self._stop.wait()
        self._stopping = True
        await runner.cleanup()

    # -- routes ------------------------------------------------------------------------------
    @staticmethod
    def error(status: int, code: str, message: str) -> web.Response:
        return web.json_response({"error": {"code": code, "message": message}}, status=status)

    def _record(self, request: web.Request, body: Any = None) -> None:
        self.requests.append((request.method, request.path_qs, body))

    async def _get_status(self, request: web.Request) -> web.Response:
        self._record(request)
        await asyncio.sleep(self.status_delay_s)
        if self.raw_status is not None:
            return web.Response(body=self.raw_status, content_type="text/html")
        return web.json_response(self.status)

    async def _explain(self, request: web.Request) -> web.Response:
        self._record(request)
        model = request.match_info["model"]
        if model not in {"mimo-vl", "deepseek-r1:32b"}:
            return self.error(404, "unknown_model", f"no model {model!r}; models: mimo-vl")
        return web.json_response(
            {
                "model": model,
                "engine": "vllm",
                "budget_mib": 16384,
                "priority": 100,
                "replicas_wanted": 1,
                "lines": [f"{model}: vllm model, budget 16.0 GiB.", "Replica 0 is on gpu0."],
                "placements": [{"replica": 0, "gpu": 0}],
                "pending": [],
            }
        )

    async def _post(self, request: web.Request) -> web.Response:
        body = await request.json()
        self._record(request, body)
        path = request.path
        names = {w["name"] for w in self.status["workers"]}
        if path.endswith("/scale") and not 0 <= body["replicas"] <= 64:
            return self.error(
                422, "invalid_value", f"replicas must be 0-64, not {body['replicas']}"
            )
        if path.startswith("/v1/models/") and path.split("/")[3] not in {
            "mimo-vl",
            "deepcoder:14b",
        }:
            return self.error(404, "unknown_model", f"no model {path.split('/')[3]!r}")
        if path.startswith("/v1/workers/") and path.split("/")[3] not in names:
            return self.error(404, "unknown_worker", f"no worker {path.split('/')[3]!r}")
        if path == "/v1/reload" and self.hooks.get("reload-refuses"):
            return self.error(422, "config_invalid", "models[0].vram_gib: must be > 0, not -1")
        seq = self.emit("operator." + path.rsplit("/", 1)[-1], f"{path} {json.dumps(body)}")
        hook = self.hooks.get(path)
        if hook is not None:
            hook(self, body)
        return web.json_response({"ok": True, "message": f"done: {path}", "event_seq": seq})

    async def _get_events(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        since = int(request.query.get("since", "0"))
        follow = request.query.get("follow") == "1"
        prefix = request.query.get("kind", "")
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        last = since
        with contextlib.suppress(ConnectionResetError):  # the client went away
            while True:
                for event in self.events:
                    if event["seq"] > last:
                        last = event["seq"]
                        if event["kind"].startswith(prefix):
                            await resp.write((json.dumps(event) + "\n").encode())
                transport = request.transport
                if not follow or self._stopping or transport is None or transport.is_closing():
                    break
                await asyncio.sleep(0.02)
            await resp.write_eof()
        return resp

    async def _get_logs(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        if request.match_info["worker"] not in {w["name"] for w in self.status["workers"]}:
            return self.error(404, "unknown_worker", "no worker 'nope'; workers: mimo-vl")
        lines = int(request.query.get("lines", "50"))
        resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await resp.prepare(request)
        await resp.write("".join(self.logs.splitlines(keepends=True)[-lines:]).encode())
        await resp.write_eof()
        return resp


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="fctl-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
def fake(sock_dir: Path) -> Iterator[FakeFleetd]:
    server = FakeFleetd(sock_dir / "control.sock")
    server.start()
    yield server
    server.stop()


def fleetctl(sock: Path | str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "--socket", str(sock), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "80", "NO_COLOR": "1"},
    )


def no_traceback(run: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in run.stdout + run.stderr, run.stderr


# --- reads -------------------------------------------------------------------------------------


def test_status_fits_80_columns_and_shows_everything(fake: FakeFleetd) -> None:
    run = fleetctl(fake.path, "status")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    out = run.stdout
    assert "RTX 4070 Ti SUPER" in out
    assert "NVIDIA" not in out
    assert "mimo-vl" in out
    assert "deepcoder:14b" in out
    assert "3m12s" in out  # uptime 192 s
    assert "deepseek-r1:32b needs 5.5 GiB" in out
    assert "cordoned" in out
    assert "gpu1" in out
    assert "\x1b[" not in out
    no_traceback(run)


def test_status_json_round_trips(fake: FakeFleetd) -> None:
    for args in (("status", "--json"), ("--json", "status")):
        run = fleetctl(fake.path, *args)
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout) == fake.status


def test_explain_prints_lines_and_json(fake: FakeFleetd) -> None:
    run = fleetctl(fake.path, "explain", "deepseek-r1:32b")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "deepseek-r1:32b: vllm model, budget 16.0 GiB.",
        "Replica 0 is on gpu0.",
    ]
    assert ("GET", "/v1/models/deepseek-r1%3A32b/explain", None) in fake.requests
    run = fleetctl(fake.path, "explain", "mimo-vl", "--json")
    assert json.loads(run.stdout)["model"] == "mimo-vl"


def test_error_body_exits_1_with_message_and_code(fake: FakeFleetd) -> None:
    run = fleetctl(fake.path, "explain", "nope")
    assert run.returncode == 1
    assert "no model 'nope'; models: mimo-vl (unknown_model)" in run.stderr
    run = fleetctl(fake.path, "scale", "mimo-vl", "65")
    assert run.returncode == 1
    assert "replicas must be 0-64, not 65 (invalid_value)" in run.stderr
    fake.hooks["reload-refuses"] = lambda *_: None
    run = fleetctl(fake.path, "reload")
    assert run.returncode == 1
    assert "(config_invalid)" in run.stderr
    no_traceback(run)


def test_events_human_json_and_filters(fake: FakeFleetd) -> None:
    run = fleetctl(fake.path, "events")
    assert run.returncode == 0, run.stderr
    first = run.stdout.splitlines()[0].split(" ", 3)
    assert len(first[0]) == 8
    assert first[0][2] == ":"
    assert first[1:] == ["1", "daemon.started", "fleetd 0.1.0 started"]
    run = fleetctl(fake.path, "events", "--json", "--since", "1", "--kind", "gpu.")
    assert [json.loads(x)["kind"] for x in run.stdout.splitlines()] == ["gpu.seen"]
    assert ("GET", "/v1/events?follow=0&since=1&kind=gpu.", None) in fake.requests


def test_events_follow_stops_on_ctrl_c_with_130(fake: FakeFleetd) -> None:
    proc = subprocess.Popen(
        [*CLI, "--socket", str(fake.path), "events", "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        assert "daemon.started" in proc.stdout.readline()
        assert "gpu.seen" in proc.stdout.readline()
        fake.emit("worker.ready", "mimo-vl is ready")
        assert "worker.ready" in proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130
    assert "Traceback" not in err


def test_logs_stream_raw_text(fake: FakeFleetd) -> None:
    run = fleetctl(fake.path, "logs", "mimo-vl", "--lines", "2")
    assert run.returncode == 0, run.stderr
    assert run.stdout == "line 2\nline 3\n"
    assert ("GET", "/v1/workers/mimo-vl/logs?follow=0&lines=2", None) in fake.requests
    run = fleetctl(fake.path, "logs", "nope")
    assert run.returncode == 1
    assert "(unknown_worker)" in run.stderr


# --- actions -----------------------------------------------------------------------------------


def test_actions_send_the_api_requests(fake: FakeFleetd) -> None:
    commands = [
        (("scale", "mimo-vl", "2"), "/v1/models/mimo-vl/scale", {"replicas": 2}),
        (("drain", "worker", "mimo-vl"), "/v1/drain", {"target": "worker", "name": "mimo-vl"}),
        (
            ("drain", "gpu", "1", "--grace", "30"),
            "/v1/drain",
            {"target": "gpu", "name": "1", "timeout_s": 30.0},
        ),
        (("undrain", "model", "mimo-vl"), "/v1/undrain", {"target": "model", "name": "mimo-vl"}),
        (("cordon", "1"), "/v1/gpus/1/cordon", {}),
        (("uncordon", "GPU-1"), "/v1/gpus/GPU-1/uncordon", {}),
        (("restart", "mimo-vl"), "/v1/workers/mimo-vl/restart", {}),
        (("reload",), "/v1/reload", {}),
    ]
    for args, path, body in commands:
        run = fleetctl(fake.path, *args)
        assert run.returncode == 0, (args, run.stderr)
        assert run.stdout == f"done: {path}\n"
        assert fake.posts()[-1] == (path, body)
    run = fleetctl(fake.path, "--json", "reload")
    assert json.loads(run.stdout) == {"ok": True, "message": "done: /v1/reload", "event_seq": 11}


def test_worker_names_are_quoted_in_paths(fake: FakeFleetd) -> None:
    fake.status["workers"].append(worker("mimo-vl#1", 1))
    run = fleetctl(fake.path, "restart", "mimo-vl#1")
    assert run.returncode == 0, run.stderr
    # quoted on the wire; the fake found the worker, so the server decoded it back
    assert fake.posts()[-1] == ("/v1/workers/mimo-vl%231/restart", {})
    assert run.stdout == "done: /v1/workers/mimo-vl#1/restart\n"


def test_usage_errors_exit_2(fake: FakeFleetd) -> None:
    for args in (("scale", "mimo-vl", "-1"), ("drain", "rack", "x"), ("frobnicate",), ()):
        run = fleetctl(fake.path, *args)
        assert run.returncode == 2, args
        no_traceback(run)
    assert fake.requests == []


# --- --wait ------------------------------------------------------------------------------------


def _drain_mimo(server: FakeFleetd, body: dict[str, Any]) -> None:
    def draining() -> None:
        server.set_worker("mimo-vl", state="draining", since_s=0.0, uptime_s=None)
        server.emit("worker.state", "mimo-vl: ready -> draining (operator)")
        server.emit("gpu.sample", "gpu1 at 31 C")  # not about the target

    def stopped() -> None:
        server.set_worker("mimo-vl", state="stopped", since_s=0.0, pid=None)
        server.emit("worker.state", "mimo-vl: stopping -> stopped")

    assert body["name"] == "mimo-vl"
    server.later(0.3, draining)
    server.later(1.2, stopped)


def test_drain_wait_shows_progress_until_stopped(fake: FakeFleetd) -> None:
    fake.hooks["/v1/drain"] = _drain_mimo
    started = time.monotonic()
    run = fleetctl(fake.path, "drain", "worker", "mimo-vl", "--wait")
    elapsed = time.monotonic() - started
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert out.startswith("done: /v1/drain\n")
    assert "worker.state mimo-vl: ready -> draining (operator)" in out
    assert "worker.state mimo-vl: stopping -> stopped" in out
    assert "gpu.sample" not in out
    assert "waiting: worker mimo-vl is draining on gpu0" in out
    assert out.rstrip().endswith("worker mimo-vl is stopped")
    assert any(path.startswith("/v1/events?since=3&follow=1") for _m, path, _b in fake.requests)
    polls = fake.count("/v1/status") - 1  # one read before the drain, for the worker's GPU
    assert polls <= elapsed / 0.5 + 1


def test_drain_wait_times_out_with_exit_4(fake: FakeFleetd) -> None:
    run = fleetctl(fake.path, "drain", "model", "mimo-vl", "--wait", "--timeout", "1")
    assert run.returncode == 4
    assert "timed out after 1 s waiting for model mimo-vl" in run.stderr
    assert "(timeout)" in run.stderr
    no_traceback(run)


def test_drain_gpu_wait_counts_every_worker_on_it(fake: FakeFleetd) -> None:
    def hook(server: FakeFleetd, _body: dict[str, Any]) -> None:
        server.later(0.2, lambda: server.set_worker("deepcoder:14b", state="stopped"))
        server.later(0.7, lambda: server.set_worker("ollama@gpu1", state="stopping"))

    fake.hooks["/v1/drain"] = hook
    run = fleetctl(fake.path, "drain", "gpu", "1", "--wait", "--timeout", "20")
    assert run.returncode == 0, run.stderr
    assert "2 still running" in run.stdout
    assert "gpu 1 is drained" in run.stdout


def test_restart_wait_until_a_new_pid_is_ready(fake: FakeFleetd) -> None:
    def hook(server: FakeFleetd, _body: dict[str, Any]) -> None:
        server.later(0.2, lambda: server.set_worker("mimo-vl", state="starting", pid=7000))
        server.later(
            0.9, lambda: server.set_worker("mimo-vl", state="ready", since_s=0.1, uptime_s=0.1)
        )

    fake.hooks["/v1/workers/mimo-vl/restart"] = hook
    run = fleetctl(fake.path, "restart", "mimo-vl", "--wait", "--timeout", "20")
    assert run.returncode == 0, run.stderr
    assert "waiting: worker mimo-vl is starting" in run.stdout
    assert "worker mimo-vl is ready again (pid 7000)" in run.stdout


def test_restart_wait_that_fails_exits_1(fake: FakeFleetd) -> None:
    def hook(server: FakeFleetd, _body: dict[str, Any]) -> None:
        fail = {"state": "failed", "since_s": 0.0, "reason": "crash loop: exited 1 five times"}
        server.later(0.3, lambda: server.set_worker("mimo-vl", **fail))

    fake.hooks["/v1/workers/mimo-vl/restart"] = hook
    run = fleetctl(fake.path, "restart", "mimo-vl", "--wait", "--timeout", "20")
    assert run.returncode == 1
    assert "worker mimo-vl failed: crash loop: exited 1 five times" in run.stderr


def test_scale_wait_counts_ready_replicas(fake: FakeFleetd) -> None:
    def hook(server: FakeFleetd, _body: dict[str, Any]) -> None:
        new = worker("mimo-vl#1", 1, state="starting", uptime_s=None, port=8002, pid=7100)
        server.later(0.2, lambda: server.status["workers"].append(new))
        server.later(0.8, lambda: server.set_worker("mimo-vl#1", state="ready"))

    fake.hooks["/v1/models/mimo-vl/scale"] = hook
    run = fleetctl(fake.path, "scale", "mimo-vl", "2", "--wait", "--timeout", "20")
    assert run.returncode == 0, run.stderr
    assert "1 of 2 ready" in run.stdout
    assert "model mimo-vl has 2 ready replica(s)" in run.stdout


def test_scale_wait_pending_exits_1_with_the_reason(fake: FakeFleetd) -> None:
    def hook(server: FakeFleetd, _body: dict[str, Any]) -> None:
        reason = "mimo-vl needs 16.0 GiB; gpu1 has 6.5 GiB free (deepcoder:14b 9.5 GiB)"
        pend = {"model": "mimo-vl", "replica": 1, "reason": reason}
        server.later(0.3, lambda: server.status["pending"].append(pend))

    fake.hooks["/v1/models/mimo-vl/scale"] = hook
    run = fleetctl(fake.path, "scale", "mimo-vl", "2", "--wait", "--timeout", "20")
    assert run.returncode == 1
    assert "model mimo-vl is pending: replica 1: mimo-vl needs 16.0 GiB" in run.stderr


# --- the daemon is not there, or not right --------------------------------------------------------


def test_no_socket_exits_3_with_what_to_do(sock_dir: Path) -> None:
    path = sock_dir / "missing.sock"
    run = fleetctl(path, "status")
    assert run.returncode == 3
    assert f"fleetd is not running (no socket at {path})" in run.stderr
    assert "systemctl start fleetd" in run.stderr
    assert "fleetd demo" in run.stderr
    no_traceback(run)


def test_stale_socket_exits_3(sock_dir: Path) -> None:
    path = sock_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))  # bound, never listening, then closed: the file stays
    run = fleetctl(path, "status")
    assert run.returncode == 3
    assert f"nobody is listening on {path}" in run.stderr
    no_traceback(run)


def test_not_a_socket_exits_3(sock_dir: Path) -> None:
    path = sock_dir / "fleetd.toml"
    path.write_text("")
    run = fleetctl(path, "status")
    assert run.returncode == 3
    assert f"{path} is not a socket" in run.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root bypasses file permissions")
def test_permission_denied_exits_3(fake: FakeFleetd) -> None:
    fake.path.chmod(0)
    try:
        run = fleetctl(fake.path, "status")
    finally:
        fake.path.chmod(0o660)
    assert run.returncode == 3
    assert f"permission denied on {fake.path}: add yourself to the socket's group" in run.stderr
    assert f"ls -l {fake.path}" in run.stderr


def test_permission_denied_message() -> None:
    """The message itself, checked in-process so it is covered when the suite runs as root."""
    err = fleetctl_client.connect_error("/run/x.sock", PermissionError(13, "no"), timeout_s=10)
    assert err.exit_code == 3
    assert err.message == (
        "permission denied on /run/x.sock: add yourself to the socket's group "
        "(ls -l /run/x.sock shows it) or use sudo"
    )


def test_no_answer_within_timeout_exits_3(fake: FakeFleetd) -> None:
    fake.status_delay_s = 5
    run = fleetctl(fake.path, "--timeout", "0.5", "status")
    assert run.returncode == 3
    assert "did not answer" in run.stderr
    no_traceback(run)


@pytest.mark.parametrize(
    "doc",
    [
        [1, 2, 3],
        {"gpus": [], "workers": [{"name": "x"}], "pending": [], "overrides": {}},
        {"gpus": "many"},
    ],
)
def test_malformed_status_exits_1(fake: FakeFleetd, doc: object) -> None:
    fake.status = doc
    run = fleetctl(fake.path, "status")
    assert run.returncode == 1
    assert "malformed response from fleetd" in run.stderr
    no_traceback(run)


def test_not_json_or_bad_event_exits_1(fake: FakeFleetd) -> None:
    fake.raw_status = b"<html>502 Bad Gateway</html>"
    run = fleetctl(fake.path, "status")
    assert run.returncode == 1
    assert "malformed response from fleetd (GET /v1/status): not JSON" in run.stderr
    fake.events.append({"seq": 99, "ts": 1.0, "kind": "x", "message": "y"})
    fake.events[-1]["message"] = 5  # type: ignore[typeddict-item]
    run = fleetctl(fake.path, "events")
    assert run.returncode == 1
    assert "malformed response" in run.stderr
    no_traceback(run)


# --- import discipline -------------------------------------------------------------------------

HEAVY = ("aiohttp", "pydantic", "rich", "structlog", "psutil", "fleetd.config", "fleetd.daemon")


def test_fleetctl_imports_no_daemon_internals() -> None:
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fleetd.cli.fleetctl", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in run.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "fleetd.cli.fleetctl_client" in imported
    heavy = sorted(m for m in imported if any(m == h or m.startswith(h + ".") for h in HEAVY))
    assert heavy == []
