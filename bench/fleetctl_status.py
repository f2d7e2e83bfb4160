"""fleetctl start-up benchmark: how long ``fleetctl status`` takes, wall clock, Python included.

A fake fleetd (aiohttp on a Unix socket, in a background thread, as the daemon serves it)
answers GET /v1/status with a realistic document: 2 GPUs, 6 workers, 1 pending replica.
``fleetctl status`` and ``fleetctl status --json`` then run as real subprocesses N times each,
the way an operator's shell runs them (the console script's form: import, call main), next to
``python -c pass`` as the floor no Python CLI can go under. Prints median and p90 in ms and
the ratio to the floor; asserts nothing (these machines are noisy). The target is < 150 ms.

Bytecode: one untimed run first writes fleetctl's .pyc files (PYTHONDONTWRITEBYTECODE is
dropped from the children's environment), as an installed package has them.

Usage: .venv/bin/python bench/fleetctl_status.py [-n 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Self

from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = "import sys; from fleetd.cli.fleetctl import main; sys.exit(main())"


def _gpu(index: int, ours: int, foreign: int) -> dict[str, Any]:
    total = 16376
    return {
        "index": index,
        "uuid": f"GPU-{index}1b2c3d4-0000-1111-2222-333344445555",
        "name": "NVIDIA GeForce RTX 4070 Ti SUPER",
        "health": "healthy",
        "health_reason": "",
        "status": "ok",
        "total_mib": total,
        "used_mib": ours + foreign,
        "ours_mib": ours,
        "foreign_mib": foreign,
        "free_mib": total - ours - foreign,
        "temperature_c": 61 + index,
        "utilization_pct": 42,
        "power_w": 180.0,
        "processes": [],
    }


def _worker(name: str, gpu: int, engine: str, kind: str, port: int, vram: int) -> dict[str, Any]:
    return {
        "name": name,
        "engine": engine,
        "kind": kind,
        "models": []
        if kind == "process" and engine == "ollama"
        else [name.split("#", maxsplit=1)[0]],
        "gpu": gpu,
        "gpu_uuid": f"GPU-{gpu}1b2c3d4-0000-1111-2222-333344445555",
        "state": "ready",
        "reason": "health check passed",
        "since_s": 7321.4,
        "uptime_s": 7321.4,
        "restarts": 1 if name == "mimo-vl" else 0,
        "port": port,
        "pid": 40000 + port,
        "vram_mib": vram,
        "budget_mib": vram + 512,
    }


STATUS: dict[str, Any] = {
    "version": "0.1.0",
    "pid": 1234,
    "uptime_s": 86000.0,
    "backend": "nvml",
    "gpus": [_gpu(0, 15800, 0), _gpu(1, 14900, 700)],
    "workers": [
        _worker("mimo-vl", 0, "vllm", "process", 8001, 15800),
        _worker("ollama@gpu1", 1, "ollama", "process", 11434, 0),
        _worker("deepcoder:14b", 1, "ollama", "model", 11434, 9216),
        _worker("qwen2.5-coder:7b", 1, "ollama", "model", 11434, 4700),
        _worker("llava:7b", 1, "ollama", "model", 11434, 900),
        _worker("nomic-embed-text", 1, "ollama", "model", 11434, 84),
    ],
    "pending": [
        {
            "model": "deepseek-r1:32b",
            "replica": 0,
            "reason": "deepseek-r1:32b needs 19.5 GiB; gpu0 has 0.6 GiB free (mimo-vl 15.4 "
            "GiB); gpu1 has 0.8 GiB free (deepcoder:14b 9.0 GiB, ...), 3.0 GiB even after "
            "evicting lower priorities",
        }
    ],
    "overrides": {
        "replicas": {},
        "cordoned": [],
        "drained_gpus": [],
        "drained_models": [],
        "drained_workers": [],
    },
    "config_path": "/etc/fleetd/fleetd.toml",
}


class FakeServer:
    """GET /v1/status on a Unix socket, from an aiohttp loop in a background thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_event: asyncio.Event | None = None
        self.thread = threading.Thread(target=asyncio.run, args=(self.serve(),), daemon=True)

    async def serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()

        async def status(_request: web.Request) -> web.Response:
            return web.json_response(STATUS)

        app = web.Application()
        app.router.add_get("/v1/status", status)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        await web.UnixSite(runner, str(self.path)).start()
        self.ready.set()
        await self.stop_event.wait()
        await runner.cleanup()

    def __enter__(self) -> Self:
        self.thread.start()
        if not self.ready.wait(10):
            raise RuntimeError("the fake fleetd did not start")
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.loop is not None and self.stop_event is not None:
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(10)


def timed(argv: list[str], env: dict[str, str], n: int) -> list[float]:
    """Wall time (ms) of ``n`` runs of argv, each checked for exit 0."""
    out = []
    for _ in range(n):
        start = time.perf_counter()
        run = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, check=False)
        out.append((time.perf_counter() - start) * 1000)
        if run.returncode != 0:
            raise RuntimeError(f"{argv} exited {run.returncode}: {run.stderr.decode()}")
    return out


def summary(label: str, ms: list[float], floor: float | None) -> str:
    med = statistics.median(ms)
    p90 = statistics.quantiles(ms, n=10)[8]
    ratio = f"  {med / floor:4.2f} x python -c pass" if floor else ""
    return f"{label:<36} median {med:6.1f} ms   p90 {p90:6.1f} ms{ratio}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-n", type=int, default=30, help="runs per command (default 30)")
    n = parser.parse_args().n
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update({"COLUMNS": "80", "NO_COLOR": "1"})
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="fctl-bench-", dir="/tmp") as tmp:
        sock = str(Path(tmp) / "control.sock")
        env["FLEETD_SOCKET"] = sock
        with FakeServer(Path(sock)):
            commands = {
                "fleetctl status": [py, "-c", CONSOLE_SCRIPT, "status"],
                "fleetctl status --json": [py, "-c", CONSOLE_SCRIPT, "status", "--json"],
                "python -m fleetd.cli.fleetctl status": [py, "-m", "fleetd.cli.fleetctl", "status"],
            }
            for argv in commands.values():  # untimed: write the .pyc files, warm the page cache
                timed(argv, env, 2)
            baseline = timed([py, "-c", "pass"], env, n)
            results = {label: timed(argv, env, n) for label, argv in commands.items()}
    floor = statistics.median(baseline)
    print(f"{n} runs each, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print(summary("python -c pass (start-up floor)", baseline, None))
    for label, ms in results.items():
        print(summary(label, ms, floor))
    overhead = statistics.median(results["fleetctl status"]) - floor
    print(f"fleetctl's own cost over the floor: {overhead:.1f} ms (target: total < 150 ms)")


if __name__ == "__main__":
    main()
