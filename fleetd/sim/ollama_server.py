"""``ollama serve`` (emulated): discovery, the HTTP server, signals, faults and shutdown.

The composition root of the emulator; the behaviour it wires together is documented in
``fleetd.sim.ollama``. Logs go to stderr in Ollama's formats (slog text lines, ``[GIN]``
access lines), so whatever parses a real server's log can parse this one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from fleetd.sim import ollama_api
from fleetd.sim import ollama_http as oh
from fleetd.sim import ollama_models as om
from fleetd.sim import ollama_openai as openai_routes
from fleetd.sim import ollama_sched as sched
from fleetd.sim.host import ENV_SIM_DIR, SimHost, SimHostError
from fleetd.sim.ollama_env import VERSION, OllamaEnv

if TYPE_CHECKING:
    from aiohttp.typedefs import Handler, Middleware

log = logging.getLogger("fleetd.sim.ollama")
access = logging.getLogger("fleetd.sim.ollama.gin")
SHUTDOWN_GRACE_S = 0.05  # http.Server.Close does not wait at all; aiohttp needs a tick


class _SlogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created).astimezone()
        when = _slog_time(stamp)
        text = record.getMessage().replace("\\", "\\\\").replace('"', '\\"')
        level = {"WARNING": "WARN", "CRITICAL": "ERROR"}.get(record.levelname, record.levelname)
        return f'time={when} level={level} source={record.filename}:{record.lineno} msg="{text}"'


def _slog_time(stamp: datetime) -> str:
    # slog's TextHandler: RFC 3339 with milliseconds, Z for UTC
    text = stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}"
    offset = oh.go_time(stamp)[-6:] if stamp.utcoffset() else "Z"
    return text + offset


def _setup_logging(environ: dict[str, str]) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_SlogFormatter())
    log.handlers[:] = [handler]
    log.setLevel(
        logging.DEBUG if environ.get("OLLAMA_DEBUG", "") not in {"", "0"} else logging.INFO
    )
    log.propagate = False
    plain = logging.StreamHandler(sys.stderr)
    access.handlers[:] = [plain]
    access.setLevel(logging.INFO)
    access.propagate = False


def discover(environ: dict[str, str]) -> tuple[SimHost | None, list[sched.Gpu]]:
    """The simulated GPUs CUDA_VISIBLE_DEVICES lets us see (none: CPU inference)."""
    root = environ.get(ENV_SIM_DIR)
    if not root:
        log.warning("%s is not set: no simulated GPUs, CPU inference only", ENV_SIM_DIR)
        return None, []
    host = SimHost(Path(root))
    try:
        every = host.gpus()
    except SimHostError as exc:
        log.warning("%s; CPU inference only", exc)
        return None, []
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    chosen = every
    if visible is not None:
        chosen = []
        for ref in (part.strip() for part in visible.split(",")):
            match = [g for g in every if ref in (str(g.index), g.uuid)]
            if not match:
                break  # CUDA stops enumerating at the first invalid id: "-1" hides them all
            chosen.append(match[0])
    gpus = [
        sched.Gpu(g.uuid, g.index, g.total_mib * om.MIB, (g.total_mib - g.reserved_mib) * om.MIB)
        for g in chosen
    ]
    for gpu, sim in zip(gpus, chosen, strict=True):
        log.info(
            'inference compute id=%s library=CUDA name=CUDA%d description="%s" total="%.1f GiB"',
            gpu.uuid,
            sim.index,
            sim.name,
            gpu.total_bytes / om.GIB,
        )
    if not gpus:
        log.info("inference compute id=cpu library=cpu name=cpu description=cpu")
    return host, gpus


def _middleware(switches: oh.Switches, inflight: set[asyncio.Transport]) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        await switches.gate()
        transport = request.transport
        if transport is not None:
            inflight.add(transport)
        started, status = time.monotonic(), 500
        try:
            try:
                response = await handler(request)
            except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
                response = web.Response(status=404, text="404 page not found")  # gin's default
            status = response.status
        except asyncio.CancelledError:
            status = 499  # the client went away (Ollama's "request canceled")
            raise
        else:
            return response
        finally:
            if transport is not None:
                inflight.discard(transport)
            access.info(
                '[GIN] %s | %3d | %12.6fms | %15s | %-7s "%s"',
                time.strftime("%Y/%m/%d - %H:%M:%S"),
                status,
                (time.monotonic() - started) * 1000,
                request.remote or "",
                request.method,
                request.path,
            )

    return middleware


def _crash(reason: str) -> None:
    # a Go panic: the process dies at once and its runners are left running (no Pdeathsig)
    sys.stderr.write(f"panic: simulated crash ({reason})\n\ngoroutine 1 [running]:\n")
    sys.stderr.flush()
    os._exit(1)


async def serve(environ: dict[str, str]) -> int:
    """Run until SIGTERM/SIGINT; return the exit status."""
    env = OllamaEnv.from_env(environ)
    catalogue = om.Catalogue.from_env(environ)
    for warning in env.warnings:
        log.warning(warning)
    host, gpus = discover(environ)
    switches = oh.Switches()
    inflight: set[asyncio.Transport] = set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    async with asyncio.TaskGroup() as tasks:
        scheduler = sched.Scheduler(env, gpus=gpus, host=host, tasks=tasks)
        log.info("vram-based default context default_num_ctx=%d", scheduler.default_ctx)
        app = web.Application(middlewares=[_middleware(switches, inflight)])
        app[oh.SCHED], app[oh.CATALOGUE] = scheduler, catalogue
        app[oh.SETTINGS], app[oh.SWITCHES] = env, switches
        ollama_api.add_routes(app)
        openai_routes.add_routes(app)
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=SHUTDOWN_GRACE_S,
            handler_cancellation=True,
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, env.host, env.port).start()
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            sys.stderr.write(f"Error: listen tcp {env.host}:{env.port}: bind: {reason}\n")
            await runner.cleanup()
            return 1
        bound = runner.addresses[0]
        where = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
        log.info("Listening on %s (version %s)", where, VERSION)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, switches.hang)
        loop.add_signal_handler(signal.SIGUSR2, _crash, "SIGUSR2")
        timers = []
        if env.faults.crash_after_s is not None:
            timers.append(loop.call_later(env.faults.crash_after_s, _crash, "crash_after_s"))
        if env.faults.hang_after_s is not None:
            timers.append(loop.call_later(env.faults.hang_after_s, switches.hang))
        await stop.wait()
        # routes.go: srvr.Close() (listeners and connections at once, no draining), then
        # sched.unloadAllRunners() (kill every runner)
        for timer in timers:
            timer.cancel()
        for transport in list(inflight):
            transport.abort()
        await runner.cleanup()
        await scheduler.close()
    return 0


def main(argv: list[str]) -> int:
    """``serve``: takes no arguments, everything comes from the environment."""
    if argv:
        sys.stderr.write(f"Error: unknown arguments for serve: {' '.join(argv)}\n")
        return 1
    environ = dict(os.environ)
    _setup_logging(environ)
    try:
        return asyncio.run(serve(environ))
    except (SimHostError, om.CatalogueError) as exc:
        sys.stderr.write(f"Error: {exc}\n")
        return 1
