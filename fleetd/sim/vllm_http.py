"""The emulated vLLM API server's HTTP surface (aiohttp standing in for FastAPI/uvicorn).

Routes and bodies as observed from vLLM 0.32/0.33 (reference A.4, vllm-on-cpu.md §3.5):
``/health`` and ``/ping`` (200 empty; 503 empty once the engine core is dead), ``/version``,
``/load``, ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions`` (SSE streams ending
in ``data: [DONE]``), ``/metrics``; ``--api-key`` guards only ``/v1``, ``/v2``, ``/inference``
and ``/cohere`` paths with 401 ``{"error":"Unauthorized"}``; unknown routes get FastAPI's
``{"detail":"Not Found"}``. Sleep-mode routes (``/sleep``, ``/wake_up``, ``/is_sleeping``)
exist only with ``VLLM_SERVER_DEV_MODE=1`` (as in vLLM) *and* ``--enable-sleep-mode``.

A hung server (SIGUSR1 / hang_after_s) accepts connections and never answers anything.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from aiohttp import web

from fleetd.sim import vllm_generate, vllm_openai, vllm_state
from fleetd.sim.vllm_args import VERSION
from fleetd.sim.vllm_client import EngineGone
from fleetd.sim.vllm_metrics import CONTENT_TYPE, SLEEP_STATES
from fleetd.sim.vllm_sched import DEAD_MESSAGE
from fleetd.sim.vllm_state import STATE, ServerState

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
GUARDED_PREFIXES = ("/v1", "/v2", "/inference", "/cohere")


# -- middlewares -----------------------------------------------------------------------------
@web.middleware
async def _hang(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    if state.scheduler.hung:
        await state.hang_forever.wait()  # never set: a deadlocked server
    return await handler(request)


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    keys = request.app[STATE].args.api_keys
    if keys and request.method != "OPTIONS" and request.path.startswith(GUARDED_PREFIXES):
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).digest()
        allowed = {hashlib.sha256(k.encode()).digest() for k in keys}
        if scheme.lower() != "bearer" or digest not in allowed:
            return vllm_state.json_body({"error": "Unauthorized"}, status=401)
    return await handler(request)


@web.middleware
async def _fastapi_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return vllm_state.json_body({"detail": "Not Found"}, status=404)
    except web.HTTPMethodNotAllowed:
        return vllm_state.json_body({"detail": "Method Not Allowed"}, status=405)


# -- plain endpoints -------------------------------------------------------------------------
async def health(request: web.Request) -> web.Response:
    """200 empty while the engine lives, 503 empty once it is dead."""
    return web.Response(status=503 if request.app[STATE].dead else 200)


async def version(_: web.Request) -> web.Response:
    """The vLLM version this emulator imitates."""
    return vllm_state.json_body({"version": VERSION})


async def load(request: web.Request) -> web.Response:
    """In-flight generation requests (counted only with --enable-server-load-tracking)."""
    return vllm_state.json_body({"server_load": request.app[STATE].server_load})


async def models(request: web.Request) -> web.Response:
    """One model card per served name."""
    state = request.app[STATE]
    cards = [
        {
            "id": name,
            "object": "model",
            "created": state.created,
            "owned_by": "vllm",
            "root": state.args.model,
            "parent": None,
            "max_model_len": state.max_model_len,
            "permission": [
                {
                    "id": f"modelperm-{uuid.uuid4().hex}",
                    "object": "model_permission",
                    "created": state.created,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }
        for name in state.args.served_model_names
    ]
    return vllm_state.json_body({"object": "list", "data": cards})


async def metrics(request: web.Request) -> web.Response:
    """The Prometheus page."""
    state = request.app[STATE]
    sched = state.scheduler
    text = state.metrics.render(
        running=len(sched.running),
        waiting=len(sched.waiting),
        kv_usage=sched.kv_usage(),
        sleep_state=SLEEP_STATES[min(state.sleep_level, 2)],
    )
    return web.Response(text=text, headers={"Content-Type": CONTENT_TYPE})


# -- sleep mode ------------------------------------------------------------------------------
async def sleep(request: web.Request) -> web.Response:
    """Pause scheduling and (level >= 1) drop the engine's GPU memory to a residual."""
    state = request.app[STATE]
    try:
        level = int(request.query.get("level", "1"))
    except ValueError:
        return vllm_state.error(vllm_openai.bad_request("level must be an integer", "level"))
    mode = request.query.get("mode", "abort")
    if mode not in {"abort", "wait", "keep"}:
        return vllm_state.error(vllm_openai.bad_request(f"Invalid pause mode: {mode}", "mode"))
    async with state.sleep_lock:
        state.scheduler.pause(keep=mode == "keep")
        if mode == "abort":
            state.scheduler.interrupt_all("abort")
        elif mode == "wait":
            await state.scheduler.wait_idle(include_waiting=False)
        if level >= 1:
            try:
                await state.engine.call("sleep", level=level)
            except EngineGone:
                return vllm_state.internal(DEAD_MESSAGE)
            state.sleep_level = level
    return web.Response(status=200)


async def wake_up(request: web.Request) -> web.Response:
    """Re-claim the memory (500 if it is not free) and resume scheduling."""
    state = request.app[STATE]
    tags = request.query.getall("tags", []) or None
    async with state.sleep_lock:
        try:
            reply = await state.engine.call("wake_up", tags=tags)
        except EngineGone:
            return vllm_state.internal(DEAD_MESSAGE)
        if not reply.get("ok"):
            return vllm_state.internal(f"Failed to wake up the engine: {reply.get('error')}")
        if not reply.get("asleep"):
            state.sleep_level = 0
            state.scheduler.resume()
    return web.Response(status=200)


async def is_sleeping(request: web.Request) -> web.Response:
    """Whether the engine is asleep (level >= 1)."""
    return vllm_state.json_body({"is_sleeping": request.app[STATE].sleep_level >= 1})


async def _on_response_start(request: web.Request, response: web.StreamResponse) -> None:
    """The header and access-log line uvicorn writes, both at response start (streams included)."""
    response.headers["Server"] = "uvicorn"
    state = request.app[STATE]
    args = state.args
    quiet = args.disable_uvicorn_access_log or args.uvicorn_log_level not in {
        "info",
        "debug",
        "trace",
    }
    if quiet or request.path in args.quiet_endpoints:
        return
    peer = request.transport.get_extra_info("peername") if request.transport else None
    who = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "-"
    phrase = HTTPStatus(response.status).phrase
    state.out.uvicorn(
        f'{who} - "{request.method} {request.path_qs} HTTP/'
        f'{request.version.major}.{request.version.minor}" {response.status} {phrase}'
    )


def build_app(state: ServerState) -> web.Application:
    """The aiohttp application for one emulated API server."""
    app = web.Application(middlewares=[_hang, _auth, _fastapi_errors])
    app[STATE] = state
    app.on_response_prepare.append(_on_response_start)
    app.router.add_get("/health", health)
    app.router.add_get("/ping", health)
    app.router.add_post("/ping", health)
    app.router.add_get("/version", version)
    app.router.add_get("/load", load)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", vllm_generate.chat_completions)
    app.router.add_post("/v1/completions", vllm_generate.completions)
    if state.dev_mode and state.args.enable_sleep_mode:
        app.router.add_post("/sleep", sleep)
        app.router.add_post("/wake_up", wake_up)
        app.router.add_get("/is_sleeping", is_sleeping)
    return app


def route_lines(app: web.Application) -> list[str]:
    """``Route: /health, Methods: GET`` lines, as vLLM logs them at start-up."""
    methods: dict[str, set[str]] = {}
    for route in app.router.routes():
        if route.method != "HEAD":
            methods.setdefault(route.resource.canonical if route.resource else "", set()).add(
                route.method
            )
    return [f"Route: {path}, Methods: {', '.join(sorted(m))}" for path, m in methods.items()]
