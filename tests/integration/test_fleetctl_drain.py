"""Drains through fleetctl on a real demo daemon: worker, GPU; and overrides across a restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from demo_proc import demo_daemon

pytestmark = pytest.mark.timeout(300)


def fleetctl(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetd.cli.fleetctl", "--socket", str(sock), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "NO_COLOR": "1"},
    )


def test_drain_worker_moves_mimo_and_evicts_by_priority(tmp_path: Path) -> None:
    with demo_daemon(tmp_path / "demo") as d:
        run = fleetctl(d.socket, "drain", "worker", "mimo-vl", "--wait", "--timeout", "90")
        assert run.returncode == 0, run.stdout + run.stderr
        d.wait("mimo-vl ready on gpu1", lambda x: x.workers()["mimo-vl"]["gpu"] == 1
               and x.workers()["mimo-vl"]["state"] == "ready")  # fmt: skip
        status = d.status()
        pending = {p["model"]: p["reason"] for p in status["pending"]}
        # gpu0 is drained for MiMo, not for the others: the specialists move to gpu0
        d.wait("specialists on gpu0", lambda x: x.workers().get("deepcoder:14b", {}).get("gpu") == 0
               and x.workers()["deepcoder:14b"]["state"] == "ready")  # fmt: skip
        assert "deepseek-r1:32b" in pending
        explain = fleetctl(d.socket, "explain", "mimo-vl")
        assert "gpu1" in explain.stdout
        assert "drained" in json.dumps(d.status()["overrides"])
        run = fleetctl(d.socket, "undrain", "worker", "mimo-vl")
        assert run.returncode == 0, run.stderr
        assert d.status()["overrides"]["drained_workers"] == []


def test_drain_gpu_then_restart_keeps_it_and_undrain(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    with demo_daemon(root) as d:
        run = fleetctl(d.socket, "drain", "gpu", "1", "--wait", "--timeout", "90")
        assert run.returncode == 0, run.stdout + run.stderr
        workers = d.workers()
        assert all(
            w["gpu"] != 1 or w["state"] not in ("ready", "starting") for w in workers.values()
        )
    with demo_daemon(root, ready=("mimo-vl",)) as again:
        doc = json.loads(fleetctl(again.socket, "status", "--json").stdout)
        assert len(doc["overrides"]["drained_gpus"]) == 1
        assert all(w["gpu"] != 1 for w in doc["workers"])
        run = fleetctl(again.socket, "undrain", "gpu", "1")
        assert run.returncode == 0, run.stderr
        again.wait(
            "the specialists back on gpu1",
            lambda x: x.workers().get("deepcoder:14b", {}).get("state") == "ready",
        )
