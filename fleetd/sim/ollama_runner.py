"""The emulated runner: the child process of ``ollama serve`` that holds one model's VRAM.

Real Ollama (v0.30+) starts one ``llama-server`` per loaded model; that child, not
``ollama serve``, owns the GPU memory, and dies with a plain kill when the model is unloaded.
This stand-in claims the planned VRAM on the simulated GPU named by its CUDA_VISIBLE_DEVICES
(the serve process sets it to the chosen GPU's UUID) for its own pid, waits out the load time,
then writes ``ready`` on stdout (the serve process's cue, standing in for llama-server's
/health) and sleeps until it is killed; the "driver" frees the memory when the pid dies.

Failures are reported like llama-server's: a line on stderr that Ollama's StatusWriter
recognises (``error loading model: ...``, ``cudaMalloc failed: ...``) and exit status 1.

It imports neither aiohttp nor asyncio: a runner starts in about 0.1 s.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time

from fleetd.sim import common
from fleetd.sim.host import SimHost, SimHostError

LEAK_TICK_S = 0.5


def _say(stream: str, line: str) -> None:
    # after `ollama serve` dies its pipes are gone; a runner outlives it (no Pdeathsig)
    out = sys.stdout if stream == "out" else sys.stderr
    with contextlib.suppress(OSError, ValueError):
        out.write(line + "\n")
        out.flush()


def main(argv: list[str]) -> int:
    """Claim, load, announce, hold (and leak when told to)."""
    parser = argparse.ArgumentParser(prog="python -m fleetd.sim.ollama runner")
    parser.add_argument("--model", required=True)
    parser.add_argument("--ctx-size", type=int, required=True)
    parser.add_argument("--n-gpu-layers", type=int, required=True)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--vram-mib", type=int, required=True)
    parser.add_argument("--load-s", type=float, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C reaches the whole group: die quietly
    faults = common.Faults.from_env()
    claim: tuple[SimHost, str] | None = None
    if args.vram_mib > 0:
        try:
            host = SimHost.from_env()
            gpu = common.visible_gpu(host)
            host.claim(gpu.uuid, args.vram_mib, name="llama-server")
        except SimHostError as exc:
            prefix = "cudaMalloc failed" if "out of memory" in str(exc) else "error loading model"
            _say("err", f"{prefix}: {exc}")
            return 1
        claim = (host, gpu.uuid)
    _say("err", f"load_tensors: offloaded {args.n_gpu_layers} layers to GPU ({args.model})")
    _say("err", f"llama_context: n_ctx = {args.ctx_size}, n_seq_max = {args.parallel}")
    time.sleep(args.load_s)
    if faults.exit_on_load:
        _say("err", "error loading model: simulated failure (FLEETD_SIM_FAULTS=exit_on_load)")
        return 1
    _say("out", "ready")
    held_mib = float(args.vram_mib)
    while True:
        time.sleep(LEAK_TICK_S if faults.leak_mib_per_s > 0 and claim else 3600)
        if claim is None or faults.leak_mib_per_s <= 0:
            continue
        held_mib += faults.leak_mib_per_s * LEAK_TICK_S
        host, uuid = claim
        try:
            host.claim(uuid, int(held_mib), name="llama-server")
        except SimHostError as exc:  # a leaking engine ends in an OOM crash
            _say("err", f"CUDA error: out of memory ({exc})")
            return 1
