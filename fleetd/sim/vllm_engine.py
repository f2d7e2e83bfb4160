"""The emulated ``VLLM::EngineCore`` process: the one that holds the simulated GPU memory.

With real vLLM the pid a supervisor spawns is only the API server; the model (and so the GPU
memory NVML reports) lives in a child titled ``VLLM::EngineCore`` (reference A.1). This process
plays that child: it runs vLLM's start-up memory check, "loads" the model while claiming memory
on the simulated host under its own pid, then serves the API server's requests (sleep, wake up,
shutdown) over a socket pair.

Behaviour that matters to a supervisor, as observed with real vLLM (vllm-on-cpu.md §3.6):

- SIGTERM or SIGINT (a process-group signal from a supervisor, or Ctrl-C) starts vLLM's
  EngineCore shutdown (``run_engine_core``'s handler): with ``--shutdown-timeout 0`` it tells
  the API server to abort in-flight requests and exits; with N > 0 it keeps its memory until
  the API server reports its requests done (or N s pass), then exits. Before the engine is
  built (while loading) the signal ends it at once.
- If the API server dies without shutting it down (SIGKILL), this process stays alive,
  orphaned, still holding its memory, until someone kills it: supervisors must kill the group.

It must not import aiohttp: it starts once per engine and should start fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import time
from dataclasses import asdict
from typing import Any

from fleetd.sim import vllm_aio, vllm_memory
from fleetd.sim.host import SimHost, SimHostError
from fleetd.sim.vllm_log import VllmLog
from fleetd.sim.vllm_spec import LABEL, TITLE, EngineSpec, set_title

SLEEP_RESIDUAL_MAX_MIB = 512  # what stays on the GPU while asleep (CUDA context, buffers)
SLEEP_RESIDUAL_FRACTION = 0.05
_SITE = "/opt/vllm/lib/python3.12/site-packages/vllm"


_FRAMES: dict[str, list[str]] = {
    "init_device": [
        f'  File "{_SITE}/v1/worker/gpu_worker.py", line 247, in init_device',
        "    self.requested_memory = request_memory(init_snapshot, self.cache_config)",
        f'  File "{_SITE}/v1/worker/utils.py", line 372, in request_memory',
        "    raise ValueError(",
    ],
    "load_model": [
        f'  File "{_SITE}/v1/worker/gpu_model_runner.py", line 3021, in load_model',
        "    self.model = model_loader.load_model(",
        (
            f'  File "{_SITE}/model_executor/model_loader/default_loader.py", line 276, '
            "in load_weights"
        ),
        "    loaded_weights = model.load_weights(self.get_all_weights(model_config, model))",
    ],
    "kv_cache": [
        f'  File "{_SITE}/v1/core/kv_cache_utils.py", line 701, in check_enough_kv_cache_memory',
        "    raise ValueError(",
    ],
}


class EngineCore:
    """The engine core's state: its plan, its claims, and whether it sleeps."""

    def __init__(
        self, spec: EngineSpec, host: SimHost, out: VllmLog, writer: asyncio.StreamWriter
    ) -> None:
        self.spec = spec
        self.host = host
        self.out = out
        self.writer = writer
        self.plan: vllm_memory.MemoryPlan | None = None
        self.asleep: set[str] = set()  # "weights", "kv_cache"
        self.leaked_mib = 0.0

    # -- messages -------------------------------------------------------------------------
    async def send(self, message: dict[str, Any]) -> None:
        """One JSON line to the API server; if it is gone, there is no one to tell."""
        with contextlib.suppress(ConnectionError, RuntimeError):
            self.writer.write((json.dumps(message) + "\n").encode())
            await self.writer.drain()

    # -- loading --------------------------------------------------------------------------
    def _fail(self, stage: str, kind: str, message: str) -> None:
        src = "core.py:866"
        tb = [
            "Traceback (most recent call last):",
            f'  File "{_SITE}/v1/engine/core.py", line 857, in run_engine_core',
            "    engine_core = EngineCoreProc(*args, **kwargs)",
            *_FRAMES.get(stage, []),
            f"{kind}: {message}",
        ]
        self.out.error(src, "EngineCore failed to start.")
        self.out.error(src, "\n".join(tb))
        self.out.raw([f"Process {LABEL}:", *tb])

    def _claim_all(self, mib: int) -> None:
        for uuid in self.spec.gpu_uuids:
            self.host.claim(uuid, mib, name=TITLE)

    def _oom(self, exc: SimHostError, rank: int, want_mib: int) -> vllm_memory.EngineInitError:
        gpu = self.host.resolve(self.spec.gpu_uuids[rank])
        free = max(0, self.host.free_mib(gpu.uuid))
        return vllm_memory.EngineInitError(
            "torch.OutOfMemoryError",
            f"CUDA out of memory. Tried to allocate {want_mib:.2f} MiB. GPU {rank} has a total "
            f"capacity of {gpu.total_mib / 1024:.2f} GiB of which {free:.2f} MiB is free. "
            f"({exc})",
        )

    async def load_or_fail(self) -> bool:
        """Load; False (after logging vLLM's traceback) if start-up fails."""
        try:
            await self.load()
        except vllm_memory.EngineInitError:
            return False
        return True

    async def load(self) -> None:
        """Start-up as vLLM does it: check free memory, load weights, size the KV cache."""
        spec, out = self.spec, self.out
        started = time.monotonic()
        out.info(
            "core.py:93",
            f"Initializing a V1 LLM engine (v0.33.0) with config: model={spec.model!r}, "
            f"enforce_eager={spec.enforce_eager}, tensor_parallel_size={len(spec.gpu_uuids)}",
        )
        stage = "init_device"
        try:
            for rank, uuid in enumerate(spec.gpu_uuids):
                gpu = self.host.resolve(uuid)
                vllm_memory.check_free(
                    rank=rank,
                    total_mib=gpu.total_mib,
                    free_mib=self.host.free_mib(uuid),
                    utilization=spec.utilization,
                )
            total = self.host.resolve(spec.gpu_uuids[0]).total_mib
            stage = "load_model"
            out.info("gpu_model_runner.py:2995", f"Starting to load model {spec.model}...")
            await asyncio.sleep(spec.load_s * 0.5)
            if spec.exit_on_load:
                raise vllm_memory.EngineInitError(  # noqa: TRY301 - reported like the others
                    "safetensors_rust.SafetensorError",
                    "Error while deserializing header: MetadataIncompleteBuffer",
                )
            weights = vllm_memory.loaded_weights_mib(
                spec.model,
                total_mib=total,
                utilization=spec.utilization,
                tp=len(spec.gpu_uuids),
                enforce_eager=spec.enforce_eager,
                weights_override_mib=spec.weights_override_mib,
            )
            try:
                self._claim_all(weights)
            except SimHostError as exc:
                raise self._oom(exc, 0, weights) from None
            out.info(
                "default_loader.py:267", f"Loading weights took {spec.load_s * 0.4:.2f} seconds"
            )
            out.info(
                "gpu_model_runner.py:3040",
                f"Model loading took {weights / 1024:.4f} GiB memory and "
                f"{spec.load_s * 0.5:.6f} seconds",
            )
            stage = "kv_cache"
            plan = vllm_memory.plan(
                model=spec.model,
                total_mib=total,
                utilization=spec.utilization,
                kv_cache_memory_bytes=spec.kv_cache_memory_bytes,
                max_model_len=spec.max_model_len,
                tp=len(spec.gpu_uuids),
                enforce_eager=spec.enforce_eager,
                weights_override_mib=spec.weights_override_mib,
                kv_kib_override=spec.kv_kib_override,
            )
            await asyncio.sleep(spec.load_s * 0.5)
            try:
                self._claim_all(plan.claim_mib)
            except SimHostError as exc:
                raise self._oom(exc, 0, plan.claim_mib - weights) from None
        except vllm_memory.EngineInitError as exc:
            self._fail(stage, exc.kind, exc.message)
            raise
        self.plan = plan
        self._log_ready(plan, time.monotonic() - started)

    def _log_ready(self, plan: vllm_memory.MemoryPlan, took_s: float) -> None:
        out, spec = self.out, self.spec
        if spec.kv_cache_memory_bytes is not None:
            out.info(
                "gpu_worker.py:755",
                f"Reserved {plan.kv_mib / 1024:.2f} GiB for the KV cache as specified by "
                "kv_cache_memory_bytes config. This does not respect the "
                "gpu_memory_utilization config. Only use kv_cache_memory_bytes config when "
                "you want manual control of KV cache memory size.",
            )
        if not spec.enforce_eager:
            out.info("monitor.py:34", f"torch.compile took {spec.load_s * 0.2:.2f} s in total")
        out.info("gpu_worker.py:773", f"Available KV cache memory: {plan.kv_mib / 1024:.2f} GiB")
        out.info(
            "kv_cache_utils.py:1148",
            f"GPU KV cache size: {plan.kv_tokens:,} tokens, Maximum concurrency for "
            f"{plan.max_model_len:,} tokens per request: "
            f"{plan.kv_tokens / plan.max_model_len:.2f}x",
        )
        if not spec.enforce_eager:
            out.info(
                "gpu_model_runner.py:3480",
                f"Graph capturing finished in 0 secs, took "
                f"{vllm_memory.CUDA_GRAPH_MIB / 1024:.2f} GiB",
            )
        out.info(
            "core.py:218",
            f"init engine (profile, create kv cache, warmup model) took {took_s:.2f} seconds",
        )

    # -- running --------------------------------------------------------------------------
    def _transfer_s(self) -> float:
        """How long a /sleep or /wake_up takes (FLEETD_SIM_SLEEP_S overrides).

        The weights cross PCIe (pinned host memory, ~12 GiB/s effective on PCIe 4.0 x16),
        plus a fixed 0.2 s.
        """
        if self.spec.sleep_s is not None:
            return self.spec.sleep_s
        weights_mib = self.plan.weights_mib if self.plan is not None else 0
        return 0.2 + weights_mib / (12 * 1024)

    def _target_mib(self) -> int:
        assert self.plan is not None
        plan = self.plan
        leak = math.ceil(self.leaked_mib)
        if not self.asleep:
            return plan.claim_mib + leak
        residual = min(SLEEP_RESIDUAL_MAX_MIB, math.ceil(plan.claim_mib * SLEEP_RESIDUAL_FRACTION))
        awake = (0 if "weights" in self.asleep else plan.weights_mib) + (
            0 if "kv_cache" in self.asleep else plan.kv_mib
        )
        return residual + awake + leak

    async def leak_forever(self) -> None:
        """Grow the claim every second (a leaking engine); an OOM kills the engine core."""
        rate = self.spec.leak_mib_per_s
        if rate <= 0:
            return
        while True:
            await asyncio.sleep(1.0)
            self.leaked_mib += rate
            try:
                self._claim_all(self._target_mib())
            except SimHostError as exc:
                self.out.error("core.py:1093", "EngineCore encountered a fatal error.")
                self.out.error(
                    "core.py:1093",
                    "Traceback (most recent call last):\n"
                    f'  File "{_SITE}/v1/engine/core.py", line 1084, in run_busy_loop\n'
                    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate "
                    f"{rate:.2f} MiB. ({exc})",
                )
                os._exit(1)

    async def handle(self, message: dict[str, Any]) -> bool:
        """One request from the API server; False when it asked us to shut down."""
        op = message.get("op")
        reply: dict[str, Any] = {"reply": message.get("id"), "ok": True}
        if op == "shutdown":
            for uuid in self.spec.gpu_uuids:
                self.host.release(uuid)
            await self.send(reply)
            return False
        if op == "sleep":
            level = int(message.get("level", 1))
            await asyncio.sleep(self._transfer_s())
            if level >= 1:
                self.asleep = {"weights", "kv_cache"}
                self._claim_all(self._target_mib())
                self.out.info(
                    "gpu_worker.py:134",
                    f"Sleep mode freed memory, {self._target_mib() / 1024:.2f} GiB "
                    "memory is still in use.",
                )
        elif op == "wake_up":
            tags = message.get("tags") or ["weights", "kv_cache"]
            waking = self.asleep.intersection(tags)
            if waking:
                await asyncio.sleep(self._transfer_s())
                before = set(self.asleep)
                self.asleep -= waking
                try:
                    self._claim_all(self._target_mib())
                except SimHostError as exc:
                    self.asleep = before
                    reply = {"reply": message.get("id"), "ok": False, "error": str(exc)}
        reply["asleep"] = sorted(self.asleep)
        await self.send(reply)
        return True


async def _commands(core: EngineCore, reader: asyncio.StreamReader) -> None:
    """Serve the API server's requests until it asks us to shut down."""
    while True:
        line = await reader.readline()
        if not line:  # the API server died without shutting us down: orphaned, as vLLM
            await asyncio.Event().wait()
        if not await core.handle(json.loads(line)):
            return


async def _serve(
    core: EngineCore, reader: asyncio.StreamReader, stop: asyncio.Event, signals: list[str]
) -> int:
    name, loaded = await vllm_aio.first(load=core.load_or_fail(), stop=stop.wait())
    if name == "stop" or not loaded:  # vLLM's handlers are installed only once it is built
        return 0 if name == "stop" else 1
    assert core.plan is not None
    await core.send({"event": "ready", **asdict(core.plan)})
    async with asyncio.TaskGroup() as tg:
        leak = tg.create_task(core.leak_forever())
        name, _ = await vllm_aio.first(commands=_commands(core, reader), stop=stop.wait())
        if name == "stop":  # vLLM's EngineCore: SIGTERM/SIGINT start its own shutdown
            timeout_s = core.spec.shutdown_timeout_s
            mode = "drain" if timeout_s > 0 else "abort"
            core.out.info(
                "core.py:1178", f"[shutdown] EngineCore: trigger received signal={signals[0]}"
            )
            core.out.info(
                "core.py:1103", f"[shutdown] EngineCore: start mode={mode} timeout={timeout_s}s"
            )
            await core.send({"event": "shutdown_requested", "mode": mode})
            if timeout_s > 0:  # drain: the API server says when its requests are done
                await vllm_aio.first(
                    commands=_commands(core, reader), timeout=asyncio.sleep(timeout_s)
                )
            core.out.info(
                "core.py:1131",
                "[shutdown] EngineCore: request processing complete; starting resource teardown",
            )
        leak.cancel()
    return 0


async def _main(fd: int) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        signals.append(sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    spec = EngineSpec.from_line(await reader.readline())
    core = EngineCore(spec, SimHost.from_env(), VllmLog(LABEL), writer)
    try:
        return await _serve(core, reader, stop, signals)
    finally:
        writer.close()


def main(argv: list[str]) -> int:
    """``engine-core VLLM::EngineCore --fd N`` (started by the emulated API server only)."""
    fd = int(argv[argv.index("--fd") + 1])
    set_title(TITLE)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # a hang switch aimed at the group
    return asyncio.run(_main(fd))
