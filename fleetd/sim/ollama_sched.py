"""The emulated Ollama scheduler: which runner serves a request, when runners load and unload.

It follows ``server/sched.go`` of Ollama v0.33 where that matters to a supervisor:

- One runner child process per loaded model; the runner, not ``ollama serve``, holds the VRAM.
  Runners share serve's process group (no Setpgid, no Pdeathsig).
- Free VRAM per GPU is the smaller of what the driver reports and total minus the predicted
  VRAM of our own runners, less OLLAMA_GPU_OVERHEAD and CUDA's 457 MiB minimum.
- The first model loads fully or partially (whole layers on the GPU, the rest on the CPU).
  With other models loaded a new one must fit in 80 % of the free VRAM, else an idle runner is
  evicted first; so is one when OLLAMA_MAX_LOADED_MODELS (0 = 3 per GPU) are loaded. The victim
  is the idle runner with the shortest keep-alive (``ByDurationAndName``), else the busiest
  one's turn comes when its requests finish.
- keep_alive: a runner that goes idle gets a timer; 0 unloads it at once, < 0 never.
- Unloading kills the runner (SIGKILL, as ``Process.Kill``); it leaves /api/ps at once, and its
  VRAM is free when the process is gone.
- A runner that dies by itself stays listed until its timer fires or a request for the model
  finds it dead and loads a new one (Ollama notices only through a failed Ping).

Requests for a model that is already loaded take it without queueing; others wait in one
line (a lock), as Ollama's single ``processPending`` loop does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from fleetd.sim import ollama_models as om
from fleetd.sim.ollama_env import FOREVER, MAX_DURATION_S, OllamaEnv

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from fleetd.sim.host import SimHost

log = logging.getLogger("fleetd.sim.ollama")

MODELS_PER_GPU = 3  # sched.go defaultModelsPerGPU
EVICT_FRACTION = 0.8  # a model loading beside others must fit in 80 % of free memory
ERR_MAX_QUEUE = "server busy, please try again.  maximum pending requests exceeded"
_ERROR_PREFIXES = (
    "panic:",
    "fatal error:",
    "error:",
    "Error:",
    "CUDA error",
    "cudaMalloc failed",
    "error loading model",
    "GGML_ASSERT",
)


class ScheduleError(Exception):
    """A request cannot get a runner; carries the HTTP status and Ollama's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class LoadRequest:
    """What a request asks of the scheduler: a model and the options that shape its runner."""

    spec: om.ModelSpec
    num_ctx: int | None = None
    num_gpu: int | None = None
    keep_alive_s: float | None = None  # None: the request did not say


@dataclass(frozen=True, slots=True)
class Gpu:
    """One GPU visible to this serve process."""

    uuid: str
    index: int
    total_bytes: int
    usable_bytes: int  # total minus the driver's reservation


def local_now() -> datetime:
    """Now, in the local time zone (Ollama prints expires_at in local time)."""
    return datetime.now().astimezone()


def _after(now: datetime, seconds: float) -> datetime:
    return now + timedelta(seconds=min(seconds, MAX_DURATION_S))


class Runner:
    """One loaded (or loading) model: its child process, plan, references and expiry."""

    def __init__(
        self,
        spec: om.ModelSpec,
        plan: om.MemoryPlan,
        *,
        gpu_uuid: str | None,
        req: LoadRequest,
        session_s: float,
    ) -> None:
        self.spec = spec
        self.plan = plan
        self.gpu_uuid = gpu_uuid
        self.session_s = session_s
        self.num_gpu_opt = req.num_gpu if req.num_gpu is not None and req.num_gpu >= 0 else -1
        self.ctx_auto = req.num_ctx is None
        self.proc: asyncio.subprocess.Process | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ready.add_done_callback(_retrieve)
        self.unloaded = asyncio.Event()
        self.slots = asyncio.Semaphore(plan.num_parallel)
        self.refcount = 0
        self.expiring = False
        self.unloading = False
        self.expires_at: datetime | None = None  # None while loading: now + session
        self.timer: asyncio.TimerHandle | None = None
        self.last_error = ""
        self.started = time.monotonic()

    @property
    def loading(self) -> bool:
        """Still waiting for the runner to say it is ready."""
        return not self.ready.done()

    @property
    def exited(self) -> bool:
        """The child process is gone (killed, crashed or failed to load)."""
        return self.proc is not None and self.proc.returncode is not None

    def expires(self, now: datetime) -> datetime:
        """expires_at as /api/ps shows it."""
        return self.expires_at if self.expires_at is not None else _after(now, self.session_s)


def _retrieve(fut: asyncio.Future[None]) -> None:
    # a load error nobody awaits any more must not be reported as "never retrieved"
    if not fut.cancelled():
        fut.exception()


class Scheduler:
    """Owns every runner; all methods run on the event loop of ``ollama serve``."""

    def __init__(
        self, env: OllamaEnv, *, gpus: list[Gpu], host: SimHost | None, tasks: asyncio.TaskGroup
    ) -> None:
        self._env = env
        self._gpus = gpus
        self._host = host
        self._tasks = tasks
        self._loaded: dict[str, Runner] = {}
        self._alive: set[Runner] = set()  # every runner whose process is not yet reaped
        self._lock = asyncio.Lock()
        self._waiting = 0
        self._closing = False
        self.max_loaded = env.max_loaded_models or MODELS_PER_GPU * max(len(gpus), 1)
        total = sum(max(0, g.total_bytes - env.gpu_overhead_bytes) for g in gpus)
        self.default_ctx = env.context_length or om.default_context(total)

    def loaded(self) -> list[Runner]:
        """Runners /api/ps lists (loading ones included, as in Ollama)."""
        return list(self._loaded.values())

    # -- requests -------------------------------------------------------------------------
    async def acquire(self, req: LoadRequest) -> Runner:
        """A ready runner for ``req`` with one of its parallel slots; loads it if needed."""
        if self._waiting >= self._env.max_queue:
            raise ScheduleError(503, ERR_MAX_QUEUE)
        self._waiting += 1
        try:
            runner, spawned = self._use_loaded(req), False
            if runner is None:
                async with self._lock:
                    runner, spawned = await self._schedule(req)
            try:
                await asyncio.shield(runner.ready)
                await runner.slots.acquire()
            except asyncio.CancelledError:
                if spawned and runner.loading:  # the client that started the load went away
                    log.warning("client connection closed before llama-server finished loading")
                    self._fail_load(
                        runner, "timed out waiting for llama-server to start: context canceled"
                    )
                self.release(runner, slot=False)
                raise
            except BaseException:
                self.release(runner, slot=False)
                raise
        finally:
            self._waiting -= 1
        return runner

    def release(self, runner: Runner, *, slot: bool = True) -> None:
        """A request is done with ``runner``: start its keep-alive timer or unload it."""
        if slot:
            runner.slots.release()
        runner.refcount -= 1
        if runner.refcount > 0 or self._closing or runner.unloading:
            return
        if runner.expiring or runner.session_s <= 0 or runner.exited or runner.loading:
            self._start_unload(runner)
            return
        now = local_now()
        runner.expires_at = _after(now, runner.session_s)
        if runner.session_s != FOREVER:
            loop = asyncio.get_running_loop()
            runner.timer = loop.call_later(runner.session_s, self._on_timer, runner)

    def expire_model(self, spec: om.ModelSpec) -> None:
        """keep_alive 0 with no prompt: unload now, or once its requests finish."""
        runner = self._loaded.get(spec.name)
        if runner is not None:
            self._expire(runner)

    # -- scheduling -----------------------------------------------------------------------
    def _use_loaded(self, req: LoadRequest) -> Runner | None:
        runner = self._loaded.get(req.spec.name)
        if runner is None or runner.expiring or self._needs_reload(runner, req):
            return None
        self._use(runner, req)
        return runner

    def _use(self, runner: Runner, req: LoadRequest) -> None:
        runner.refcount += 1
        if runner.timer is not None:
            runner.timer.cancel()
            runner.timer = None
        if req.keep_alive_s is not None:
            runner.session_s = req.keep_alive_s

    def _needs_reload(self, runner: Runner, req: LoadRequest) -> bool:
        if runner.exited:
            return True
        if req.num_gpu is not None and req.num_gpu >= 0 and req.num_gpu != runner.num_gpu_opt:
            return True
        if req.num_ctx is None and runner.ctx_auto:
            return False
        want = om.effective_context(req.spec, req.num_ctx or self.default_ctx)
        return want != runner.plan.num_ctx

    async def _schedule(self, req: LoadRequest) -> tuple[Runner, bool]:
        while True:
            if self._closing:
                raise ScheduleError(500, "server is shutting down")
            runner = self._loaded.get(req.spec.name)
            victim: Runner | None
            if runner is not None:
                if not runner.expiring and not self._needs_reload(runner, req):
                    self._use(runner, req)
                    return runner, False
                log.debug("reloading runner model=%s", req.spec.name)
                victim = runner
            elif len(self._loaded) >= self.max_loaded:
                log.debug("max runners achieved, unloading one to make room")
                victim = self._pick_victim()
            else:
                placement = await self._place(req)
                if placement is not None:
                    gpu_uuid, plan = placement
                    return self._spawn(req, gpu_uuid, plan), True
                victim = self._pick_victim()
            if victim is not None:
                self._expire(victim)
                await victim.unloaded.wait()

    def _pick_victim(self) -> Runner | None:
        def order(r: Runner) -> tuple[float, str]:
            return (r.session_s, r.spec.name)

        runners = sorted(self._loaded.values(), key=order)
        idle = [r for r in runners if r.refcount <= 0]
        if idle:
            return idle[0]
        return runners[0] if runners else None

    async def _place(self, req: LoadRequest) -> tuple[str | None, om.MemoryPlan] | None:
        spec = req.spec
        parallel = self._env.num_parallel if spec.has("completion") else 1
        ctx = om.effective_context(spec, req.num_ctx or self.default_ctx)

        def plan(available: int | None) -> om.MemoryPlan:
            return om.plan_memory(
                spec,
                num_ctx=ctx,
                num_parallel=parallel,
                num_gpu=req.num_gpu,
                available_bytes=available,
            )

        if self._host is None or not self._gpus or req.num_gpu == 0:
            return None, plan(None)
        own = {g.uuid: 0 for g in self._gpus}
        for r in self._loaded.values():
            if r.gpu_uuid in own:
                own[r.gpu_uuid] += r.plan.vram_bytes
        available = await asyncio.to_thread(self._available, self._host, own)
        plans = {uuid: plan(free) for uuid, free in available.items()}
        full = [u for u, p in plans.items() if p.vram_bytes == p.total_bytes]
        # best single-GPU fit; else the GPU with the most room takes a partial load
        room = available.__getitem__
        uuid = min(full, key=room) if full else max(available, key=room)
        chosen = plans[uuid]
        explicit_partial = req.num_gpu is not None and 0 <= req.num_gpu < spec.layers
        if self._loaded and not explicit_partial:
            if chosen.total_bytes > available[uuid] * EVICT_FRACTION:
                log.info("llama-server model predicted to exceed available memory, evicting")
                return None
            log.info("llama-server model fits alongside existing models")
        return uuid, chosen

    def _available(self, host: SimHost, own: dict[str, int]) -> dict[str, int]:
        out = {}
        for gpu in self._gpus:
            driver_free = host.free_mib(gpu.uuid) * om.MIB
            free = min(driver_free, gpu.usable_bytes - own[gpu.uuid])
            out[gpu.uuid] = max(0, free - self._env.gpu_overhead_bytes - om.CUDA_MINIMUM_BYTES)
        return out

    # -- runner processes -----------------------------------------------------------------
    def _spawn(self, req: LoadRequest, gpu_uuid: str | None, plan: om.MemoryPlan) -> Runner:
        session_s = req.keep_alive_s if req.keep_alive_s is not None else self._env.keep_alive_s
        runner = Runner(req.spec, plan, gpu_uuid=gpu_uuid, req=req, session_s=session_s)
        env = dict(os.environ)
        if gpu_uuid is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu_uuid
        load_s = self._env.load_s + self._env.faults.slow_start_s
        argv = [
            sys.executable,
            "-m",
            "fleetd.sim.ollama",
            "runner",
            "--model",
            req.spec.name,
            "--ctx-size",
            str(plan.num_ctx),
            "--n-gpu-layers",
            str(plan.gpu_layers),
            "--parallel",
            str(plan.num_parallel),
            "--vram-mib",
            str(plan.vram_mib),
            "--load-s",
            f"{load_s:g}",
        ]
        self._use(runner, req)
        self._loaded[req.spec.name] = runner
        log.info("loaded runners count=%d", len(self._loaded))
        # the child is started and watched by a task of the scheduler, not by the request,
        # so a request cancelled mid-spawn cannot leave an unwatched runner behind
        self._tasks.create_task(self._guard(self._run(runner, argv, env)), name=req.spec.name)
        return runner

    async def _run(self, runner: Runner, argv: list[str], env: dict[str, str]) -> None:
        log.info("starting llama-server cmd=%r", " ".join(argv[1:]))
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
            )  # same process group as serve: Ollama leaves SysProcAttr empty on Linux
        except OSError as exc:
            self._fail_load(runner, f"failed to start llama-server: {exc}")
            return
        runner.proc = proc
        self._alive.add(runner)
        if self._closing or runner.unloading:
            await _kill(runner)
        if proc.stdout is not None and proc.stderr is not None:  # always, with PIPE
            await self._watch(runner, proc, proc.stdout, proc.stderr)

    async def _guard(self, coro: Coroutine[Any, Any, None]) -> None:
        # the one loop boundary of a scheduler task: log, never take the TaskGroup down
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("scheduler task failed")

    async def _watch(
        self,
        runner: Runner,
        proc: asyncio.subprocess.Process,
        stdout: asyncio.StreamReader,
        stderr_pipe: asyncio.StreamReader,
    ) -> None:
        stderr = self._tasks.create_task(self._guard(self._drain_stderr(runner, stderr_pipe)))
        line = await stdout.readline()
        if line.strip() == b"ready" and not runner.ready.done():
            runner.ready.set_result(None)
            log.info("llama-server started in %.2f seconds", time.monotonic() - runner.started)
        code = await proc.wait()
        await stderr
        self._alive.discard(runner)
        if runner.loading:
            self._fail_load(runner, _terminated(code, runner.last_error))
        elif not runner.unloading:
            log.error("llama-server terminated exit=%s pid=%d", code, proc.pid)

    async def _drain_stderr(self, runner: Runner, pipe: asyncio.StreamReader) -> None:
        # runner output goes to serve's log, as Ollama's StatusWriter copies it to stderr
        async for raw in pipe:
            text = raw.decode(errors="replace").rstrip()
            if text.startswith(_ERROR_PREFIXES):
                runner.last_error = text
            sys.stderr.write(text + "\n")

    def _fail_load(self, runner: Runner, message: str) -> None:
        if not runner.ready.done():
            log.error("error loading llama server error=%r", message)
            runner.ready.set_exception(ScheduleError(500, message))
        self._expire(runner)

    def _on_timer(self, runner: Runner) -> None:
        runner.timer = None
        if runner.refcount <= 0:
            log.debug("timer expired, expiring to unload model=%s", runner.spec.name)
            self._start_unload(runner)

    def _expire(self, runner: Runner) -> None:
        runner.expiring = True
        runner.session_s = 0.0
        runner.expires_at = local_now()
        if runner.timer is not None:
            runner.timer.cancel()
            runner.timer = None
        if runner.refcount <= 0:
            self._start_unload(runner)

    def _start_unload(self, runner: Runner) -> None:
        if runner.unloading:
            return
        runner.unloading = True
        if self._loaded.get(runner.spec.name) is runner:
            del self._loaded[runner.spec.name]
        self._tasks.create_task(self._guard(self._unload(runner)), name="unload")

    async def _unload(self, runner: Runner) -> None:
        try:
            await _kill(runner)
        finally:
            runner.unloaded.set()
        log.info("runner unloaded model=%s", runner.spec.name)

    async def close(self) -> None:
        """unloadAllRunners: kill every runner (loading ones too) and reap them."""
        self._closing = True
        for runner in list(self._loaded.values()) + list(self._alive):
            if runner.timer is not None:
                runner.timer.cancel()
            runner.unloading = True
        self._loaded.clear()
        await asyncio.gather(*(_kill(r) for r in list(self._alive)))


async def _kill(runner: Runner) -> None:
    proc = runner.proc
    if proc is None:
        return
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    await proc.wait()


def _terminated(code: int, message: str) -> str:
    # llama_server.go WaitUntilRunning: "exit status N: msg", or Go's "signal: killed"
    if code < 0:
        with contextlib.suppress(ValueError):
            name = (signal.strsignal(-code) or f"signal {-code}").lower()
            return f"llama-server process has terminated: signal: {name}"
    status = f"exit status {code}"
    if message:
        return f"llama-server process has terminated: {status}: {message}"
    return f"llama-server process has terminated: {status}"
