"""Restart benchmark: how fast fleetd brings a killed engine back, and what fleetd costs.

Prints figures and ratios; asserts nothing about time (these machines are noisy). Measured,
all in one run on the same machine with the same emulated engines:

1. the engine's bare start time (spawn -> /health 200), without any supervisor;
2. under fleetd: kill -9 of a vLLM worker -> restart issued (STARTING event) -> READY;
3. the same kill under supervisord (autorestart) -> /health 200 again;
4. fleetd's and supervisord's RSS and idle CPU supervising 2 GPUs' worth of 4 workers.

fleetd runs as a real subprocess (``fleetd demo --config``), and times come from its JSON
event log. The backoff before the first restart is policy (``backoff_initial_s``); it is set
to 0.1 s here so the figures show fleetd's own latency, and reported.

Usage: .venv/bin/python bench/restart.py [--kills 5] [--idle-s 20]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

import psutil

from fleetd.sim.host import SimHost

LOAD_S = 1.0
GPUS = [("sim A", 16384, 0), ("sim B", 16384, 0)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_health(url: str, timeout_s: float = 60.0) -> float:
    """Seconds until GET url answers 200 (connection refused while loading)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            with urllib.request.urlopen(url, timeout=0.5) as resp:
                if resp.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.01)
    raise TimeoutError(url)


def sim_env(sim: SimHost) -> dict[str, str]:
    return {
        **os.environ,
        "FLEETD_SIM_DIR": str(sim.root),
        "FLEETD_SIM_LOAD_S": str(LOAD_S),
    }


def vllm_argv(port: int, util: str = "0.25") -> list[str]:
    return [
        sys.executable, "-m", "fleetd.sim.vllm", "serve", "tiny-model", "--host", "127.0.0.1",
        "--port", str(port), "--gpu-memory-utilization", util,
    ]  # fmt: skip


def bare_start(tmp: Path, runs: int) -> list[float]:
    sim = SimHost.create(tmp / "bare-sim", GPUS)
    times = []
    for _ in range(runs):
        port = free_port()
        proc = subprocess.Popen(
            vllm_argv(port),
            env={**sim_env(sim), "CUDA_VISIBLE_DEVICES": "0"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        start = time.monotonic()
        wait_health(f"http://127.0.0.1:{port}/health")
        times.append(time.monotonic() - start)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return times


FLEET = """
[daemon]
state_dir = "{root}/state"
log_dir = "{root}/logs"
log_format = "json"
[engines.vllm]
command = ["{python}", "-m", "fleetd.sim.vllm"]
ports = {{ first = {p0}, last = {p1} }}
[engines.ollama]
command = ["{python}", "-m", "fleetd.sim.ollama"]
ports = {{ first = {p2}, last = {p3} }}
[gateway]
port = {p4}
[[simulation.gpus]]
name = "sim A"
total_mib = 16384
[[simulation.gpus]]
name = "sim B"
total_mib = 16384
[[models]]
name = "tiny-a"
engine = "vllm"
model = "tiny-model"
vram_gib = 4.0
overhead_gib = 0.0
preferred_gpus = [0]
[models.health]
{health}
[[models]]
name = "tiny-b"
engine = "vllm"
model = "tiny-model"
vram_gib = 4.0
overhead_gib = 0.0
preferred_gpus = [1]
[models.health]
{health}
[[models]]
name = "llama3.2:3b"
engine = "ollama"
model = "llama3.2:3b"
vram_gib = 2.0
overhead_gib = 0.5
preferred_gpus = [0]
[[models]]
name = "qwen2.5vl:3b"
engine = "ollama"
model = "qwen2.5vl:3b"
vram_gib = 3.2
overhead_gib = 0.5
preferred_gpus = [1]
"""

HEALTH = """backoff_initial_s = 0.1
backoff_max_s = 1
probe_interval_s = 1
probe_timeout_s = 1
max_restarts = 100"""


class EventLog:
    """Reads fleetd's JSON log lines from its stdout in a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                with self._cond:
                    self.events.append(event)
                    self._cond.notify_all()

    def wait(
        self, pred: Callable[[dict[str, Any]], bool], start: int = 0, timeout_s: float = 60.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for event in self.events[start:]:
                    if pred(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("event not seen")
                self._cond.wait(remaining)


def _ready_event(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("worker") == name and e.get("new") == "ready"


def ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def idle_usage(pids: list[int], seconds: float) -> tuple[float, float]:
    """(RSS MiB summed, CPU % of one core) over an idle window."""
    procs = [psutil.Process(p) for p in pids]
    cpu0 = sum(p.cpu_times().user + p.cpu_times().system for p in procs)
    time.sleep(seconds)
    cpu1 = sum(p.cpu_times().user + p.cpu_times().system for p in procs)
    rss = sum(p.memory_info().rss for p in procs) / 2**20
    return rss, 100 * (cpu1 - cpu0) / seconds


def under_fleetd(tmp: Path, kills: int, idle_s: float) -> dict[str, Any]:
    root = tmp / "fleetd"
    root.mkdir()
    base = free_port()
    cfg = root / "fleetd.toml"
    cfg.write_text(
        FLEET.format(
            root=root,
            python=sys.executable,
            health=HEALTH,
            p0=base + 1,
            p1=base + 20,
            p2=base + 21,
            p3=base + 40,
            p4=base + 41,
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetd", "demo", "--config", str(cfg), "--dir", str(root),
         "--load-s", str(LOAD_S), "--gateway-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    log = EventLog(proc)
    try:
        for name in ("tiny-a", "tiny-b", "llama3.2:3b", "qwen2.5vl:3b"):
            log.wait(_ready_event(name))
        rss, cpu = idle_usage([proc.pid], idle_s)
        detect, ready = [], []
        for _ in range(kills):
            mark = len(log.events)
            ready_ev = [
                e for e in log.events if e.get("worker") == "tiny-a" and e.get("new") == "ready"
            ][-1]
            pid = int(ready_ev["pid"])
            t_kill = time.time()
            os.kill(pid, signal.SIGKILL)
            started = log.wait(
                lambda e: e.get("worker") == "tiny-a" and e.get("new") == "starting", mark
            )
            back = log.wait(lambda e: e.get("worker") == "tiny-a" and e.get("new") == "ready", mark)
            detect.append(ts(started) - t_kill)
            ready.append(ts(back) - t_kill)
            time.sleep(2.5)  # ready for > backoff_max_s: the next kill is a first crash again
        return {"rss_mib": rss, "cpu_pct": cpu, "to_restart_s": detect, "to_ready_s": ready}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


SUPERVISORD = """
[supervisord]
nodaemon=true
logfile={root}/supervisord.log
pidfile={root}/supervisord.pid
[unix_http_server]
file={root}/supervisor.sock
[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
[supervisorctl]
serverurl=unix://{root}/supervisor.sock
[program:vllm-a]
command={vllm_a}
environment=CUDA_VISIBLE_DEVICES="0"
autorestart=true
startsecs=0
stopasgroup=true
killasgroup=true
[program:vllm-b]
command={vllm_b}
environment=CUDA_VISIBLE_DEVICES="1"
autorestart=true
startsecs=0
stopasgroup=true
killasgroup=true
[program:ollama-a]
command={python} -m fleetd.sim.ollama serve
environment=CUDA_VISIBLE_DEVICES="0",OLLAMA_HOST="127.0.0.1:{oa}"
autorestart=true
stopasgroup=true
killasgroup=true
[program:ollama-b]
command={python} -m fleetd.sim.ollama serve
environment=CUDA_VISIBLE_DEVICES="1",OLLAMA_HOST="127.0.0.1:{ob}"
autorestart=true
stopasgroup=true
killasgroup=true
"""


def _program_child(supervisord_pid: int, marker: str) -> psutil.Process | None:
    """The live child of supervisord whose command line contains ``marker``."""
    for child in psutil.Process(supervisord_pid).children():
        with contextlib.suppress(psutil.Error):
            if marker in " ".join(child.cmdline()):
                return child
    return None


def under_supervisord(tmp: Path, kills: int, idle_s: float) -> dict[str, Any]:
    root = tmp / "supervisord"
    root.mkdir()
    sim = SimHost.create(root / "sim", GPUS)
    pa, pb, oa, ob = free_port(), free_port(), free_port(), free_port()
    conf = root / "supervisord.conf"
    conf.write_text(
        SUPERVISORD.format(
            root=root,
            python=sys.executable,
            oa=oa,
            ob=ob,
            vllm_a=" ".join(vllm_argv(pa)),
            vllm_b=" ".join(vllm_argv(pb)),
        )
    )
    exe = Path(sys.executable).with_name("supervisord")
    proc = subprocess.Popen(
        [str(exe), "-c", str(conf)], env=sim_env(sim), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_health(f"http://127.0.0.1:{pa}/health")
        wait_health(f"http://127.0.0.1:{pb}/health")
        wait_health(f"http://127.0.0.1:{oa}/")
        wait_health(f"http://127.0.0.1:{ob}/")
        rss, cpu = idle_usage([proc.pid], idle_s)
        ready: list[float | None] = []
        orphans: list[int] = []
        for _ in range(kills):
            child = _program_child(proc.pid, f"--port {pa}")
            if child is None:  # supervisord gave up on it (FATAL after startretries)
                ready.append(None)
                orphans.append(0)
                continue
            group = [c.pid for c in child.children(recursive=True)]
            t_kill = time.monotonic()
            child.kill()
            with contextlib.suppress(psutil.Error):
                child.wait(5)
            try:
                wait_health(f"http://127.0.0.1:{pa}/health", timeout_s=20)
                ready.append(time.monotonic() - t_kill)
            except TimeoutError:
                ready.append(None)  # did not come back: see the orphans
            orphans.append(sum(1 for pid in group if psutil.pid_exists(pid)))
            time.sleep(0.5)
        held = sum(c.used_mib for c in sim.claims() if c.uuid == sim.gpus()[0].uuid)
        return {
            "rss_mib": rss, "cpu_pct": cpu, "to_ready_s": ready, "orphans": orphans,
            "gpu0_held_mib": held,
        }  # fmt: skip
    finally:
        for pid in [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for claim in sim.claims():  # the orphaned EngineCores supervisord left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(claim.pid, signal.SIGKILL)


def med(values: list[float]) -> float:
    return statistics.median(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--bare-runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleetd-bench-") as tmp_name:
        tmp = Path(tmp_name)
        bare = bare_start(tmp, args.bare_runs)
        fleet = under_fleetd(tmp, args.kills, args.idle_s)
        sup = under_supervisord(tmp, args.kills, args.idle_s)
    print(f"emulated vLLM, load time {LOAD_S:.1f} s; {args.kills} kills each; medians")
    print(f"bare start (spawn -> /health 200)        {med(bare):6.3f} s   runs={len(bare)}")
    print(
        f"fleetd: kill -9 -> restart issued        {med(fleet['to_restart_s']):6.3f} s"
        "   (includes backoff_initial_s=0.1 +-20 %)"
    )
    print(f"fleetd: kill -9 -> ready                 {med(fleet['to_ready_s']):6.3f} s")
    sup_ok = [t for t in sup["to_ready_s"] if t is not None]
    failed = len(sup["to_ready_s"]) - len(sup_ok)
    print(
        f"supervisord: kill -9 -> /health 200      {med(sup_ok) if sup_ok else float('nan'):6.3f} s"
        f"   ({failed} of {len(sup['to_ready_s'])} kills never came back within 20 s)"
    )
    print(
        f"supervisord: orphaned EngineCores alive after each kill {sup['orphans']}; "
        f"gpu0 memory still held at the end {sup['gpu0_held_mib']} MiB"
    )
    print(f"ratio fleetd ready / bare start          {med(fleet['to_ready_s']) / med(bare):6.2f}")
    if sup_ok:
        print(f"ratio supervisord ready / bare start     {med(sup_ok) / med(bare):6.2f}")
        ratio = med(fleet["to_ready_s"]) / med(sup_ok)
        print(f"ratio fleetd / supervisord (to ready)    {ratio:6.2f}")
    print(f"fleetd idle: RSS {fleet['rss_mib']:.1f} MiB, CPU {fleet['cpu_pct']:.2f} % of a core"
          f" (2 GPUs, 4 workers + 2 Ollama models, over {args.idle_s:.0f} s)")  # fmt: skip
    print(f"supervisord idle: RSS {sup['rss_mib']:.1f} MiB, CPU {sup['cpu_pct']:.2f} % of a core"
          f" (4 programs)")  # fmt: skip
    print("raw:", json.dumps({"bare": bare, "fleetd": fleet, "supervisord": sup}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
