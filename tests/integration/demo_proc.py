"""A `fleetd demo` daemon as a real subprocess, and a tiny synchronous client for its socket."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class UnixConnection(http.client.HTTPConnection):
    """HTTP over the control socket."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def call(sock: Path, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
    """One request; (status, parsed JSON or text)."""
    conn = UnixConnection(sock)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, raw.decode(errors="replace")


@dataclass
class DemoDaemon:
    """A running `fleetd demo`."""

    proc: subprocess.Popen[bytes]
    root: Path

    @property
    def socket(self) -> Path:
        return self.root / "control.sock"

    def status(self) -> dict[str, Any]:
        code, body = call(self.socket, "GET", "/v1/status")
        assert code == 200, body
        assert isinstance(body, dict)
        return body

    def workers(self) -> dict[str, dict[str, Any]]:
        return {w["name"]: w for w in self.status()["workers"]}

    def wait(self, what: str, pred: Callable[[DemoDaemon], bool], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if pred(self):
                    return
            except (OSError, AssertionError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}: {self.workers()}")


READY_WORKERS = ("mimo-vl", "ollama@gpu1", "deepcoder:14b", "qwen2.5vl:3b", "mixtral:8x22b")


@contextmanager
def demo_daemon(
    root: Path,
    *,
    load_s: float = 0.3,
    config: Path | None = None,
    ready: tuple[str, ...] = READY_WORKERS,
    long_lived: bool = False,
) -> Iterator[DemoDaemon]:
    """Start `fleetd demo` in ``root``; wait until ``ready`` workers are; SIGTERM at the end."""
    argv = [sys.executable, "-m", "fleetd", "demo", "--dir", str(root), "--load-s", str(load_s)]
    argv += ["--gateway-port", "0"]
    if config is not None:
        argv += ["--config", str(config)]
    root.mkdir(parents=True, exist_ok=True)
    log = (root / "fleetd.out").open("wb")
    proc = subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={
            **os.environ,
            "FLEETD_SIM_TOKEN_S": "0.005",
            # a module-scoped daemon's engines may outlive one test (see tests/conftest.py)
            "FLEETD_TEST_LONG_LIVED": "1" if long_lived else "0",
        },
    )
    daemon = DemoDaemon(proc, root)
    try:
        daemon.wait(
            "the demo fleet to be ready",
            lambda d: all(d.workers().get(n, {}).get("state") == "ready" for n in ready),
        )
        yield daemon
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
