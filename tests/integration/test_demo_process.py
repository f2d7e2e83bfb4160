"""`fleetd demo` as a user runs it: a real process, SIGTERM, nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.timeout(120)


def test_demo_brings_the_fleet_up_and_sigterm_stops_everything(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetd",
            "demo",
            "--dir",
            str(tmp_path),
            "--load-s",
            "0.5",
            "--gateway-port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert proc.stdout is not None
    want = {"mimo-vl", "ollama@gpu1", "deepcoder:14b", "qwen2.5vl:3b", "mixtral:8x22b"}
    ready: set[str] = set()
    engines: set[int] = set()
    deadline = time.monotonic() + 60
    try:
        for line in proc.stdout:
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("new") == "ready":
                    ready.add(event["worker"])
                if event.get("pid") and event.get("new") == "starting":
                    engines.add(int(event["pid"]))
            if want <= ready or time.monotonic() > deadline:
                break
        assert want <= ready, f"ready: {sorted(ready)}"
        trees = set(engines)
        for pid in engines:
            try:
                trees |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
            except psutil.NoSuchProcess:
                continue
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, rest[-2000:]
    assert '"daemon.stopped"' in rest
    alive = [p for p in trees if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert alive == [], f"engine processes survived fleetd: {alive}"
    assert not (tmp_path / "control.sock").exists()
    assert list((tmp_path / "state" / "workers").glob("*.json")) == []
