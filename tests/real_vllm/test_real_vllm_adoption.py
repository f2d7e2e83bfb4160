"""A fleetd restart reloads no real vLLM model: kill -9 of fleetd, the next one adopts it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import vllm_cpu

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]


def config_for(env: vllm_cpu.VllmCpu, path: Path) -> None:
    path.write_text(f"""
[engines.vllm]
command = {json.dumps(list(env.command))}
ports = {{ first = 18700, last = 18750 }}

[[simulation.gpus]]
name = "sim"
total_mib = 16384

[[models]]
name = "tiny"
engine = "vllm"
model = "{env.model_dir}"
vram_gib = 3.0
overhead_gib = 1.0
max_model_len = 512
engine_args = ["--enforce-eager", "--kv-cache-memory-bytes", "64M"]
[models.health]
start_timeout_s = 400
probe_interval_s = 1
probe_timeout_s = 1
stop_grace_s = 20
""")


def status(sock: Path) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "fleetd.cli.fleetctl", "--socket", str(sock), "status", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    doc = json.loads(out.stdout) if out.returncode == 0 else {}
    assert isinstance(doc, dict)
    return doc


def tiny(sock: Path) -> dict[str, object] | None:
    try:
        workers = status(sock).get("workers", [])
    except (ValueError, OSError):
        return None
    assert isinstance(workers, list)
    return next((w for w in workers if w.get("name") == "tiny"), None)


def start(root: Path, config: Path, tmpdir: Path, env: vllm_cpu.VllmCpu) -> subprocess.Popen[bytes]:
    root.mkdir(parents=True, exist_ok=True)
    with (root.parent / f"fleetd-{time.monotonic_ns()}.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "fleetd", "demo", "--real-engines", "--config", str(config),
             "--dir", str(root), "--gateway-port", "0"],
            env={**env.environ(tmpdir), "PATH": os.environ["PATH"]},
            stdout=log,  # the child keeps its own copy of the descriptor
            stderr=subprocess.STDOUT,
        )  # fmt: skip


def wait_ready(sock: Path, timeout_s: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        worker = tiny(sock)
        if worker is not None and worker.get("state") == "ready":
            return worker
        time.sleep(0.5)
    raise AssertionError(f"tiny not ready in {timeout_s} s: {tiny(sock)}")


def test_restarted_fleetd_adopts_the_real_vllm(tmp_path: Path) -> None:
    env = vllm_cpu.ensure()
    config = tmp_path / "fleetd.toml"
    config_for(env, config)
    root = tmp_path / "demo"
    sock = root / "control.sock"
    with env.instance_tmpdir() as tmpdir:
        first = start(root, config, tmpdir, env)
        second: subprocess.Popen[bytes] | None = None
        pid = 0
        try:
            worker = wait_ready(sock, 400)
            pid = int(str(worker["pid"]))
            first.send_signal(signal.SIGKILL)
            first.wait()
            assert psutil.Process(pid).is_running()  # vLLM outlived fleetd
            second = start(root, config, tmpdir, env)
            t0 = time.monotonic()
            again = wait_ready(sock, 120)
            adopt_s = time.monotonic() - t0
            assert again["pid"] == pid, "vLLM was started again instead of adopted"
            assert again["restarts"] == 0
            port = again["port"]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as resp:
                assert json.loads(resp.read())["data"][0]["id"] == "tiny"
            sys.stdout.write(f"\nadopted the running vLLM {adopt_s:.1f} s after fleetd restarted\n")
        finally:
            for proc in (first, second):
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(120)
            if pid and psutil.pid_exists(pid):
                vllm_cpu.kill_group(pid)
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
