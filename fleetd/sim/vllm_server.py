"""The emulated vLLM API server's life: start-up, readiness, faults, signals, shutdown.

The sequence mirrors vLLM 0.33 as documented and observed (reference A.4/A.6, vllm-on-cpu.md
§3.3/§3.6):

1. Bind the port at once but do not listen: while the engine core loads, connecting gives
   "connection refused", and a second server cannot take the port.
2. Start the engine-core child and wait for it; if it fails, print vLLM's
   ``RuntimeError: Engine core initialization failed ...`` and exit 1.
3. Log the ready lines, then listen ("Application startup complete." comes just before).
4. SIGTERM/SIGINT: ``--shutdown-timeout 0`` aborts in-flight requests and exits 0 at once;
   N > 0 keeps /health at 200, refuses new requests with HTTP 500, lets running ones finish
   for up to N s, then aborts the rest. During loading a SIGTERM interrupts start-up the way
   vLLM's temporary ``KeyboardInterrupt("terminated")`` handler does. A group SIGTERM also
   reaches the engine core, which then drains or aborts on its own (``vllm_engine``).
5. If the engine core dies, /health turns 503 and the server exits 0 a few seconds later
   (vLLM's watchdog), unless ``VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1``.

Fault switches (``fleetd.sim.common``): crash_after_s / SIGUSR2 exit 1 at once (engine core
killed with it); hang_after_s / SIGUSR1 stop answering for good (SIGTERM is then ignored, as
in the observed shutdown hangs: only SIGKILL ends it); exit_on_load, slow_start_s and
leak_mib_per_s act in the engine core.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from fleetd.sim import common, vllm_aio, vllm_http, vllm_setup, vllm_state
from fleetd.sim.host import SimGpuDef, SimHostError
from fleetd.sim.vllm_args import VERSION, ServeArgs
from fleetd.sim.vllm_client import EngineCoreClient, EngineGone
from fleetd.sim.vllm_log import VllmLog
from fleetd.sim.vllm_metrics import Metrics
from fleetd.sim.vllm_sched import DEAD_MESSAGE, SHUTDOWN_MESSAGE, Scheduler
from fleetd.sim.vllm_spec import LABEL

if TYPE_CHECKING:
    import socket

INTERRUPTED = -int(signal.SIGINT)  # "exit code" of a start-up interrupted by SIGTERM
_DEAD_TRACE = (
    "AsyncLLM output_handler failed.\n"
    "Traceback (most recent call last):\n"
    '  File "/opt/vllm/lib/python3.12/site-packages/vllm/v1/engine/async_llm.py", '
    "line 515, in output_handler\n"
    "    outputs = await engine_core.get_output_async()\n"
    f"vllm.v1.engine.exceptions.EngineDeadError: {DEAD_MESSAGE}"
)


class ApiServer:
    """One emulated ``vllm serve`` process."""

    def __init__(self, args: ServeArgs) -> None:
        self.args = args
        self.out = VllmLog("APIServer")
        self.engine = EngineCoreClient()
        self.stop = asyncio.Event()
        self.crash = asyncio.Event()
        self.hang_requested = asyncio.Event()
        self.state: vllm_state.ServerState | None = None
        self.runner: web.AppRunner | None = None

    # -- start-up ---------------------------------------------------------------------------
    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        loop.add_signal_handler(signal.SIGUSR2, self.crash.set)
        loop.add_signal_handler(signal.SIGUSR1, self._hang)

    def _hang(self) -> None:
        self.hang_requested.set()
        if self.state is not None:
            self.state.scheduler.hang()

    async def run(self) -> int:
        """Serve until stopped; the process exit code."""
        args, out = self.args, self.out
        out.info("api_server.py:1839", f"vLLM API server version {VERSION}")
        out.info("utils.py:253", f"non-default args: {args.non_default}")
        try:
            setup = vllm_setup.setup(args)
        except SimHostError as exc:
            out.error("cuda.py:754", str(exc))
            return 1
        try:
            sock, url = vllm_setup.bind(args)
        except OSError as exc:
            out.error("launcher.py:97", f"OSError: {exc}")
            return 1
        with sock:
            self._install_signals()
            await self.engine.start(setup.spec)
            try:
                return await self._start(sock, url, setup)
            except Exception:  # a bug of ours must not orphan the engine core (SIGKILL may)
                await self.engine.kill()
                raise

    async def _start(self, sock: socket.socket, url: str, setup: vllm_setup.Setup) -> int:
        name, ready = await vllm_aio.first(
            ready=self.engine.wait_ready(), stop=self.stop.wait(), crash=self.crash.wait()
        )
        if name == "crash":
            return await self._crash()
        if name == "stop":  # vLLM's temporary handler: KeyboardInterrupt("terminated")
            self.out.raw(["KeyboardInterrupt: terminated"])
            await self.engine.terminate()
            return INTERRUPTED
        if ready is None:
            code = self.engine.proc.returncode if self.engine.proc else 1
            failure = (
                f"(APIServer pid={os.getpid()}) RuntimeError: Engine core initialization "
                f"failed. See root cause above. Failed core proc(s): {{'{LABEL}': {code}}}"
            )
            self.out.raw([failure])
            return 1
        await self._listen(sock, url, ready, setup.gpus[0], setup.token_s)
        return await self._serve(setup.faults, setup.dead_exit_s)

    async def _listen(
        self, sock: socket.socket, url: str, plan: dict[str, Any], gpu: SimGpuDef, token_s: float
    ) -> None:
        args, out = self.args, self.out
        metrics = Metrics(
            args.name,
            max_model_len=plan["max_model_len"],
            cache_info={
                "block_size": "16",
                "cache_dtype": "auto",
                "enable_prefix_caching": "True",
                "gpu_memory_utilization": str(args.gpu_memory_utilization),
                "num_gpu_blocks": str(plan["kv_tokens"] // 16),
            },
        )
        default_seqs = 1024 if gpu.total_mib >= 70 * 1024 else 256
        scheduler = Scheduler(
            metrics,
            max_num_seqs=args.max_num_seqs or default_seqs,
            token_s=token_s,
            kv_tokens=plan["kv_tokens"],
        )
        self.state = vllm_state.ServerState(
            args=args,
            max_model_len=plan["max_model_len"],
            scheduler=scheduler,
            metrics=metrics,
            engine=self.engine,
            out=out,
            dev_mode=os.environ.get("VLLM_SERVER_DEV_MODE", "0") not in {"", "0"},
        )
        if self.hang_requested.is_set():
            scheduler.hang()
        app = vllm_http.build_app(self.state)
        self.runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=2.0
        )
        await self.runner.setup()
        out.info("api_server.py:1610", "Supported tasks: ['generate']")
        out.info("api_server.py:1912", f"Starting vLLM server on {url}")
        out.info("launcher.py:37", "Available routes are:")
        for line in vllm_http.route_lines(app):
            out.info("launcher.py:45", line)
        out.uvicorn(f"Started server process [{os.getpid()}]")
        out.uvicorn("Waiting for application startup.")
        out.uvicorn("Application startup complete.")
        await web.SockSite(self.runner, sock).start()

    # -- running ----------------------------------------------------------------------------
    async def _serve(self, faults: common.Faults, dead_exit_s: float) -> int:
        async with asyncio.TaskGroup() as tg:
            reader = tg.create_task(self.engine.run())
            background = [
                tg.create_task(self._fault_timers(faults)),
                tg.create_task(self._log_stats()),
                tg.create_task(self._follow_engine_shutdown()),
            ]
            code = await self._supervise(dead_exit_s)
            for task in background:
                task.cancel()
            if not self.engine.exited.is_set():
                reader.cancel()
        return code

    async def _fault_timers(self, faults: common.Faults) -> None:
        started = time.monotonic()
        timers = sorted(
            (delay, kind)
            for delay, kind in ((faults.crash_after_s, "crash"), (faults.hang_after_s, "hang"))
            if delay is not None
        )
        for delay, kind in timers:
            await asyncio.sleep(max(0.0, started + delay - time.monotonic()))
            if kind == "crash":
                self.crash.set()
            else:
                self._hang()

    async def _log_stats(self) -> None:
        interval = vllm_setup.env_float("VLLM_LOG_STATS_INTERVAL", 10.0)
        if self.args.disable_log_stats or interval <= 0 or self.state is None:
            return
        metrics, sched = self.state.metrics, self.state.scheduler
        last = (metrics.prompt_tokens, metrics.generation_tokens)
        was_idle = True
        while True:
            await asyncio.sleep(interval)
            now = (metrics.prompt_tokens, metrics.generation_tokens)
            idle = now == last and not sched.running and not sched.waiting
            if not (idle and was_idle):
                self.out.info(
                    "loggers.py:123",
                    f"Engine 000: Avg prompt throughput: {(now[0] - last[0]) / interval:.1f} "
                    f"tokens/s, Avg generation throughput: {(now[1] - last[1]) / interval:.1f} "
                    f"tokens/s, Running: {len(sched.running)} reqs, Waiting: "
                    f"{len(sched.waiting)} reqs, GPU KV cache usage: {sched.kv_usage():.1%}, "
                    "Prefix cache hit rate: 0.0%",
                )
            last, was_idle = now, idle

    async def _supervise(self, dead_exit_s: float) -> int:
        assert self.state is not None
        while True:
            if self.state.scheduler.hung:  # deadlocked: deaf to SIGTERM, only SIGKILL helps
                await self.crash.wait()  # (the crash switch still works, it is ours)
                return await self._crash()
            name, _ = await vllm_aio.first(
                stop=self.stop.wait(),
                crash=self.crash.wait(),
                dead=self.engine.exited.wait(),
                hang=self.hang_requested.wait(),
            )
            if name == "crash":
                return await self._crash()
            if name == "dead":  # a group SIGTERM may end the engine core a moment before
                await asyncio.sleep(0.05)  # our own handler runs: then it is a shutdown
            if name == "dead" and not self.stop.is_set():
                return await self._engine_died(dead_exit_s)
            if name != "hang":
                return await self._shutdown()

    async def _follow_engine_shutdown(self) -> None:
        """The engine core got SIGTERM itself (a group signal): do what vLLM's client does."""
        assert self.state is not None
        await self.engine.shutdown_requested.wait()
        sched = self.state.scheduler
        sched.abort_new = True  # the EngineCore rejects new requests by aborting them
        if self.engine.shutdown_mode == "abort":
            sched.interrupt_all("abort")
        await sched.wait_idle()
        with contextlib.suppress(EngineGone):
            await self.engine.call("shutdown")

    async def _crash(self) -> int:
        self.out.error("core_client.py:564", "EngineCore encountered a fatal error.")
        self.out.error("async_llm.py:527", _DEAD_TRACE)
        await self.engine.kill()
        sys.stdout.flush()
        os._exit(1)

    async def _engine_died(self, dead_exit_s: float) -> int:
        assert self.state is not None
        state = self.state
        self.out.error(
            "core_client.py:564",
            f"Engine core proc {LABEL} died unexpectedly, shutting down client.",
        )
        state.dead = True
        state.scheduler.refuse_new(DEAD_MESSAGE)
        state.scheduler.interrupt_all("error")
        self.out.error("async_llm.py:527", _DEAD_TRACE)
        if os.environ.get("VLLM_KEEP_ALIVE_ON_ENGINE_DEATH", "0") not in {"", "0"}:
            await self.stop.wait()
        else:
            await vllm_aio.first(watchdog=asyncio.sleep(dead_exit_s), stop=self.stop.wait())
            self.out.error("launcher.py:128", "Engine is dead. Shutting down the API server.")
        await self._close_http()
        return 0

    async def _shutdown(self) -> int:
        assert self.state is not None
        sched, timeout_s = self.state.scheduler, self.args.shutdown_timeout_s
        mode = "drain" if timeout_s > 0 else "abort"
        self.out.info("launcher.py:88", "[shutdown] API server: shutdown triggered")
        self.out.info(
            "launcher.py:95",
            f"[shutdown] API server: stopping engine client mode={mode} timeout={timeout_s}s",
        )
        sched.refuse_new(SHUTDOWN_MESSAGE)
        if timeout_s > 0:
            await vllm_aio.first(drained=sched.wait_idle(), timeout=asyncio.sleep(timeout_s))
        sched.interrupt_all("abort")
        await self._close_http()
        await self.engine.shutdown()
        self.out.uvicorn(f"Finished server process [{os.getpid()}]")
        return 0

    async def _close_http(self) -> None:
        self.out.uvicorn("Shutting down")
        if self.runner is not None:
            await self.runner.cleanup()
        self.out.uvicorn("Waiting for application shutdown.")
        self.out.uvicorn("Application shutdown complete.")


def run(args: ServeArgs) -> int:
    """Run one emulated API server to completion; its exit code."""
    return asyncio.run(ApiServer(args).run())
