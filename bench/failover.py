"""Failover benchmark: from a GPU fault to the primary model ready on the other GPU.

Prints figures and ratios; asserts nothing about time. Each run starts a fresh ``fleetd demo``
subprocess on a simulated 2 x 16 GiB host with the reference lab in miniature: MiMo (emulated
vLLM, 14 + 2 GiB) on gpu0, two Ollama specialists on gpu1. Then gpu0 is lost
(``SimHost.set_fault(lost=True)``, what ``python -m fleetd.sim DIR lose 0`` does) and the
timeline is read from fleetd's JSON event log:

    fault -> gpu.lost (detection: the backend's poll + gpus.health_debounce_s)
          -> the specialists on gpu1 drained and unloaded (eviction)
          -> mimo-vl starting (cold) or waking (warm standby) on gpu1
          -> mimo-vl ready (engine: the emulated load, or the wake-up)

Modes: ``cold`` (no standby: a full load of FLEETD_SIM_LOAD_S) and ``warm`` (``standby =
true``: a standby asleep on gpu1 is woken; the emulator's wake-up moves the weights at
12 GiB/s, ~1.4 s for MiMo's 14 GiB). fleetd's own share is the
total minus what the engines took (Ollama unloads, the vLLM load or wake-up) minus the
configured debounce; that is the latency fleetd adds.

Usage: .venv/bin/python bench/failover.py [--runs 3] [--load-s 8] [--modes cold,warm]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

from restart import EventLog, free_port, ts

from fleetd.sim.host import SimHost

DEBOUNCE_S = 0.5
LAB = """
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
port = 0
[gpus]
health_debounce_s = {debounce}
failback = "manual"
[[simulation.gpus]]
name = "sim A"
total_mib = 16384
[[simulation.gpus]]
name = "sim B"
total_mib = 16384
[[models]]
name = "mimo-vl"
engine = "vllm"
model = "XiaomiMiMo/MiMo-VL-7B-RL"
vram_gib = 14.0
overhead_gib = 2.0
priority = 100
preferred_gpus = [0]
standby = {standby}
[models.health]
start_timeout_s = 120
drain_timeout_s = 5
probe_interval_s = 0.5
probe_timeout_s = 0.5
[[models]]
name = "deepcoder:14b"
engine = "ollama"
model = "deepcoder:14b"
vram_gib = 9.0
overhead_gib = 0.5
priority = 50
[[models]]
name = "qwen2.5vl:3b"
engine = "ollama"
model = "qwen2.5vl:3b"
vram_gib = 3.2
overhead_gib = 0.3
priority = 40
"""
SPECIALISTS = ("deepcoder:14b", "qwen2.5vl:3b")


def is_state(worker: str, new: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("worker") == worker and e.get("new") == new


def one_run(tmp: Path, *, warm: bool, load_s: float) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="run-", dir=tmp))
    base = free_port()
    cfg = root / "fleetd.toml"
    cfg.write_text(
        LAB.format(
            root=root,
            python=sys.executable,
            p0=base + 1,
            p1=base + 20,
            p2=base + 21,
            p3=base + 40,
            debounce=DEBOUNCE_S,
            standby="true" if warm else "false",
        )
    )
    # the emulator's /wake_up takes what moving MiMo's ~14 GiB of weights over PCIe would
    env = {**os.environ, "FLEETD_SIM_TOKEN_S": "0.01"}
    env.pop("FLEETD_SIM_SLEEP_S", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetd", "demo", "--config", str(cfg), "--dir", str(root),
         "--load-s", str(load_s), "--gateway-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env=env,
    )  # fmt: skip
    log = EventLog(proc)
    try:
        log.wait(is_state("mimo-vl", "ready"), timeout_s=120)
        for name in SPECIALISTS:
            log.wait(is_state(name, "ready"), timeout_s=120)
        if warm:
            log.wait(is_state("mimo-vl~standby", "standby"), timeout_s=120)
            asleep_at = _last(log, "standby")
            for name in SPECIALISTS:  # back after the standby went to sleep
                log.wait(is_state(name, "ready"), start=asleep_at, timeout_s=120)
        time.sleep(1.0)
        mark = len(log.events)
        sim = SimHost(root / "sim")
        t_fault = time.time()
        sim.set_fault(sim.gpus()[0].uuid, lost=True)
        lost = log.wait(lambda e: e.get("event") == "gpu.lost", mark, timeout_s=60)
        unloaded = [log.wait(is_state(n, "stopped"), mark, timeout_s=60) for n in SPECIALISTS]
        ready = log.wait(
            lambda e: (
                e.get("worker") == "mimo-vl" and e.get("new") == "ready" and e.get("gpu") == 1
            ),
            mark,
            timeout_s=180,
        )
        begin_new = "ready" if warm else "starting"
        engine_begin = _engine_begin(log, mark, warm=warm, fallback=begin_new)
        drains = [log.wait(is_state(n, "draining"), mark, timeout_s=5) for n in SPECIALISTS]
        t_lost, t_ready = ts(lost), ts(ready)
        t_unloaded = max(ts(e) for e in unloaded)
        t_drain = min(ts(e) for e in drains)
        t_engine = ts(engine_begin)
        total = t_ready - t_fault
        engine_s = t_ready - t_engine
        unload_s = t_unloaded - t_drain
        return {
            "detect_s": t_lost - t_fault,
            "evict_s": t_unloaded - t_lost,
            "engine_s": engine_s,
            "total_s": total,
            "fleetd_s": total - engine_s - unload_s - DEBOUNCE_S,
        }
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _last(log: EventLog, new: str) -> int:
    for i in range(len(log.events) - 1, -1, -1):
        if log.events[i].get("new") == new:
            return i
    return 0


def _engine_begin(log: EventLog, mark: int, *, warm: bool, fallback: str) -> dict[str, Any]:
    """The event at which the engine's own work on gpu1 began."""
    if warm:  # the wake-up request went out
        return log.wait(lambda e: e.get("event") == "worker.waking", mark, timeout_s=60)
    return log.wait(
        lambda e: e.get("worker") == "mimo-vl" and e.get("new") == fallback and e.get("gpu") == 1,
        mark,
        timeout_s=60,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--load-s", type=float, default=8.0, help="emulated cold load time")
    parser.add_argument("--modes", default="cold,warm")
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="fleetd-bench-failover-") as tmp:
        for _ in range(args.runs):
            for mode in args.modes.split(","):
                run = one_run(Path(tmp), warm=mode == "warm", load_s=args.load_s)
                results.setdefault(mode, []).append(run)
                print(f"{mode}: " + "  ".join(f"{k} {v:.2f}" for k, v in run.items()), flush=True)
    print()
    print(
        f"medians of {args.runs} runs; emulated cold load {args.load_s:g} s, "
        "wake-up as PCIe allows,"
    )
    print(f"gpus.health_debounce_s = {DEBOUNCE_S:g} (inside detection)")
    cols = ("detect_s", "evict_s", "engine_s", "total_s", "fleetd_s")
    print(f"{'mode':6}" + "".join(f"{c:>11}" for c in cols))
    med = {
        m: {c: statistics.median(r[c] for r in runs) for c in cols} for m, runs in results.items()
    }
    for mode, row in med.items():
        print(f"{mode:6}" + "".join(f"{row[c]:11.2f}" for c in cols))
    if "cold" in med and "warm" in med:
        ratio = med["cold"]["total_s"] / med["warm"]["total_s"]
        print(f"warm standby: fault -> ready {ratio:.1f}x faster than a cold load")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
