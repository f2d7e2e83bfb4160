"""The control socket: aiohttp on a Unix socket inside the daemon's event loop.

Mode and group come from ``[control]``; the caller's uid/pid (SO_PEERCRED) is recorded on
every mutating call. Bodies are limited to 64 KiB; every error is JSON
``{"error": {"code", "message"}}`` with a stable code, and nothing a client sends — bad
JSON, wrong types, huge bodies, unknown routes — can disturb the daemon: the handler turns
it into a 4xx and the loop goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from fleetd.api import views
from fleetd.control import Caller, Control, ControlError
from fleetd.ollama_slot import OllamaSlot

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

    from fleetd.config import ControlSpec
    from fleetd.obs.events import Event, EventBus, Subscription

MAX_BODY_BYTES = 64 * 1024
CONTROL: web.AppKey[Control] = web.AppKey("control", Control)
BUS: web.AppKey[EventBus] = web.AppKey("bus", object)  # type: ignore[arg-type]
INFO: web.AppKey[dict[str, Any]] = web.AppKey("info", dict)
# set when the server stops: long-lived streams (events --follow, logs --follow) end at once
CLOSING: web.AppKey[asyncio.Event] = web.AppKey("closing", asyncio.Event)

_STATUS_FOR = {
    "bad_request": 400,
    "too_large": 413,
    "not_found": 404,
    "unknown_model": 404,
    "unknown_worker": 404,
    "unknown_gpu": 404,
    "invalid_value": 422,
    "config_invalid": 422,
    "timeout": 504,
    "internal": 500,
}


def error(code: str, message: str) -> web.Response:
    """A JSON error response with the status for ``code``."""
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=_STATUS_FOR.get(code, 400)
    )


_HTTP_CODES = {
    web.HTTPRequestEntityTooLarge: ("too_large", f"request body over {MAX_BODY_BYTES} bytes"),
    web.HTTPNotFound: ("not_found", "no such route; see /v1/openapi.json"),
    web.HTTPMethodNotAllowed: ("not_found", "method not allowed on this route"),
}


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ControlError as exc:
        return error(exc.code, str(exc))
    except web.HTTPException as exc:
        code, text = _HTTP_CODES.get(type(exc), ("bad_request", exc.reason))
        return error(code, f"{request.method} {request.path}: {text}")
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as exc:  # noqa: BLE001 - a request must never take the daemon down
        bus = request.app[BUS]
        bus.emit(
            "api.error", f"{request.method} {request.path} failed: {type(exc).__name__}: {exc}"
        )
        return error("internal", f"{type(exc).__name__}: {exc}")


def _caller(request: web.Request) -> Caller:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return Caller()
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return Caller()
    pid, uid, _gid = struct.unpack("3i", raw)
    return Caller(uid=uid, pid=pid)


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ControlError("bad_request", f"body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ControlError("bad_request", "body must be a JSON object")
    return doc


def _field(doc: dict[str, Any], key: str, kind: type, *, required: bool = True) -> Any:  # noqa: ANN401
    if key not in doc:
        if required:
            raise ControlError("bad_request", f"missing field {key!r}")
        return None
    value = doc[key]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        what = {int: "a whole number", float: "a number", str: "a string"}.get(kind, kind.__name__)
        raise ControlError("bad_request", f"field {key!r} must be {what}, not {value!r}")
    return value


async def get_status(request: web.Request) -> web.Response:
    """GET /v1/status."""
    info = request.app[INFO]
    body = views.status(
        request.app[CONTROL],
        started_at=info["started_at"],
        config_path=info["config_path"],
        now_s=asyncio.get_running_loop().time(),
    )
    return web.json_response(body)


async def get_explain(request: web.Request) -> web.Response:
    """GET /v1/models/{model}/explain."""
    control = request.app[CONTROL]
    model = request.match_info["model"]
    control.model_spec(model)  # raises unknown_model with the known names
    body = views.explain(control, model, request.app[BUS], now_s=asyncio.get_running_loop().time())
    return web.json_response(body)


async def post_scale(request: web.Request) -> web.Response:
    """POST /v1/models/{model}/scale."""
    doc = await _body(request)
    replicas = _field(doc, "replicas", int)
    result = request.app[CONTROL].scale(request.match_info["model"], replicas, _caller(request))
    return web.json_response(result)


async def post_drain(request: web.Request) -> web.Response:
    """POST /v1/drain and /v1/undrain."""
    doc = await _body(request)
    target = _field(doc, "target", str)
    if target not in ("worker", "gpu", "model"):
        raise ControlError("bad_request", f"target must be worker, gpu or model, not {target!r}")
    name = _field(doc, "name", str)
    control = request.app[CONTROL]
    if request.path.endswith("/undrain"):
        return web.json_response(control.undrain(target, name, _caller(request)))
    timeout_s = _field(doc, "timeout_s", float, required=False)
    return web.json_response(control.drain(target, name, _caller(request), timeout_s=timeout_s))


async def post_cordon(request: web.Request) -> web.Response:
    """POST /v1/gpus/{gpu}/cordon and /uncordon."""
    await _body(request)
    on = request.path.endswith("/cordon")
    result = request.app[CONTROL].cordon(request.match_info["gpu"], _caller(request), on=on)
    return web.json_response(result)


async def post_restart(request: web.Request) -> web.Response:
    """POST /v1/workers/{worker}/restart."""
    await _body(request)
    result = request.app[CONTROL].restart(request.match_info["worker"], _caller(request))
    return web.json_response(result)


async def post_reload(request: web.Request) -> web.Response:
    """POST /v1/reload."""
    await _body(request)
    return web.json_response(request.app[CONTROL].reload(_caller(request)))


def _int_query(request: web.Request, key: str, default: int) -> int:
    raw = request.query.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ControlError("bad_request", f"query {key}={raw!r} is not a whole number") from None
    if value < 0:
        raise ControlError("bad_request", f"query {key} must be >= 0")
    return value


async def get_events(request: web.Request) -> web.StreamResponse:
    """GET /v1/events: NDJSON, the history since ``since`` and, with follow=1, what comes."""
    bus = request.app[BUS]
    since = _int_query(request, "since", 0)
    follow = request.query.get("follow", "0") in ("1", "true", "yes")
    prefix = request.query.get("kind", "")
    kinds = (prefix,) if prefix else ()
    sub = bus.subscribe(maxsize=10_000) if follow else None
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    try:
        last = since
        for event in bus.recent(since_seq=since, kinds=kinds):
            await resp.write((json.dumps(event.to_json(), default=str) + "\n").encode())
            last = event.seq
        closing = request.app[CLOSING]
        while sub is not None:
            followed = await _next_or_none(sub, closing)
            if followed is None:
                break
            if followed.seq <= last or (prefix and not followed.kind.startswith(prefix)):
                continue
            await resp.write((json.dumps(followed.to_json(), default=str) + "\n").encode())
            last = followed.seq
        await resp.write_eof()
    except ConnectionResetError:
        pass  # the follower went away (Ctrl-C, --wait done): nothing to report
    finally:
        if sub is not None:
            sub.close()
    return resp


async def _next_or_none(sub: Subscription, closing: asyncio.Event) -> Event | None:
    """The next event, or None once the server is closing."""
    getter: asyncio.Future[Any] = asyncio.ensure_future(sub.get())
    stopper: asyncio.Future[Any] = asyncio.ensure_future(closing.wait())
    try:
        await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not getter.done():
            getter.cancel()
    return getter.result() if getter.done() and not getter.cancelled() else None


async def get_logs(request: web.Request) -> web.StreamResponse:
    """GET /v1/workers/{worker}/logs: the last N lines of the engine's log file, then follow."""
    control = request.app[CONTROL]
    name = request.match_info["worker"]
    owner = control.reconciler.find(name)
    if owner is None:
        raise ControlError("unknown_worker", control.unknown_worker_message(name))
    serve = owner.serve if isinstance(owner, OllamaSlot) else owner
    path: Path = serve.spec.log_path
    lines = _int_query(request, "lines", 50)
    follow = request.query.get("follow", "0") in ("1", "true", "yes")
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await resp.prepare(request)
    offset = 0
    try:
        data = await asyncio.to_thread(path.read_bytes)
        tail = b"\n".join(data.splitlines()[-lines:]) + b"\n" if lines and data else b""
        await resp.write(tail)
        offset = len(data)
    except FileNotFoundError:
        await resp.write(f"(no log yet at {path})\n".encode())
    with contextlib.suppress(ConnectionResetError):
        if follow:
            await _follow_file(resp, path, offset, request.app[CLOSING])
        await resp.write_eof()
    return resp


async def _follow_file(
    resp: web.StreamResponse, path: Path, offset: int, closing: asyncio.Event
) -> None:
    while not closing.is_set():
        await asyncio.sleep(0.25)  # tail -f of a file another process appends to
        try:
            size = (await asyncio.to_thread(path.stat)).st_size
        except FileNotFoundError:
            continue
        if size < offset:  # rotated (copy-truncate): start from the top
            offset = 0
        if size > offset:
            with path.open("rb") as fh:
                fh.seek(offset)
                chunk = fh.read(size - offset)
            offset = size
            await resp.write(chunk)


async def get_openapi(request: web.Request) -> web.Response:
    """GET /v1/openapi.json."""
    del request
    from fleetd.api.openapi import spec  # noqa: PLC0415

    return web.json_response(spec())


def build_app(control: Control, bus: EventBus, *, config_path: str) -> web.Application:
    """The aiohttp application (also used by tests without a socket)."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_errors])
    app[CONTROL] = control
    app[BUS] = bus
    app[INFO] = {"started_at": time.time(), "config_path": config_path}
    app[CLOSING] = asyncio.Event()
    app.router.add_get("/v1/status", get_status)
    app.router.add_get("/v1/models/{model}/explain", get_explain)
    app.router.add_post("/v1/models/{model}/scale", post_scale)
    app.router.add_post("/v1/drain", post_drain)
    app.router.add_post("/v1/undrain", post_drain)
    app.router.add_post("/v1/gpus/{gpu}/cordon", post_cordon)
    app.router.add_post("/v1/gpus/{gpu}/uncordon", post_cordon)
    app.router.add_post("/v1/workers/{worker}/restart", post_restart)
    app.router.add_post("/v1/reload", post_reload)
    app.router.add_get("/v1/events", get_events)
    app.router.add_get("/v1/workers/{worker}/logs", get_logs)
    app.router.add_get("/v1/openapi.json", get_openapi)
    return app


class ControlServer:
    """Runs the app on the configured Unix socket."""

    def __init__(self, app: web.Application, spec: ControlSpec) -> None:
        self._app = app
        self._spec = spec
        self._runner: web.AppRunner | None = None

    @property
    def path(self) -> Path:
        """The socket's path."""
        return self._spec.socket_path

    async def start(self) -> None:
        """Bind the socket (replacing a stale one), then set its mode and group."""
        path = self._spec.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if await _in_use(path):
                raise ControlError(
                    "internal",
                    f"control socket {path} is in use: is another fleetd running? "
                    "Stop it, or set [control].socket_path",
                )
            path.unlink()
        # handler_cancellation: a client that goes away cancels its handler (a follower of
        # the event stream must not linger until the next event)
        self._runner = web.AppRunner(
            self._app,
            handle_signals=False,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=5.0,
        )
        await self._runner.setup()
        site = web.UnixSite(self._runner, str(path))
        await site.start()
        path.chmod(int(self._spec.socket_mode, 8))
        if self._spec.socket_group:
            try:
                gid = grp.getgrnam(self._spec.socket_group).gr_gid
                os.chown(path, -1, gid)
            except (KeyError, PermissionError) as exc:
                raise ControlError(
                    "internal",
                    f"cannot give {path} to group {self._spec.socket_group!r}: {exc}; create the "
                    "group (packaging/sysusers.d) or change [control].socket_group",
                ) from None

    async def stop(self) -> None:
        """Stop accepting, finish what is in flight (briefly), remove the socket."""
        self._app[CLOSING].set()  # end followed streams now, not after the shutdown timeout
        if self._runner is None:
            return  # never started: the socket (maybe another fleetd's) is not ours to remove
        await self._runner.cleanup()
        self._runner = None
        with contextlib.suppress(FileNotFoundError):
            self._spec.socket_path.unlink()


async def _in_use(path: Path) -> bool:
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
