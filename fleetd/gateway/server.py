"""The gateway's HTTP server: OpenAI and Ollama endpoints over the fleet's ready workers.

One aiohttp application on the configured host:port, on fleetd's event loop, so routing sees
the supervisors' states as they change (a worker that starts draining is out of the next
decision) and drains see the gateway's in-flight counts. Request bodies are parsed once to
route and to rewrite ``model`` to the engine's own name; responses are streamed through
chunk by chunk as the engine writes them (``await write`` is the backpressure), never
buffered whole. A retry on the next candidate happens only while nothing has been sent to
the client; after that an engine failure ends the stream with an error event in the API's
own shape (see docs/gateway.md for exactly what a client sees).
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from fleetd.config import Engine
from fleetd.gateway import errors
from fleetd.gateway.inflight import Inflight
from fleetd.gateway.routing import Api, Kind, NoRoute, Replica, Route, RouteTable, inspect, route
from fleetd.obs.metrics import GatewayCounters

if TYPE_CHECKING:
    from pathlib import Path

    from fleetd.api.schemas import GatewayJson
    from fleetd.config import FleetConfig, GatewaySpec
    from fleetd.obs.events import EventBus

Fleet = Callable[[Inflight], list[Replica]]
"""Returns the ready replicas now, with the gateway's outstanding counts filled in."""

_OPENAI_POSTS = {
    "/v1/chat/completions": Kind.CHAT,
    "/v1/completions": Kind.COMPLETION,
    "/v1/embeddings": Kind.EMBEDDING,
}
_OLLAMA_POSTS = {
    "/api/chat": Kind.CHAT,
    "/api/generate": Kind.COMPLETION,
    "/api/embed": Kind.EMBEDDING,
    "/api/embeddings": Kind.EMBEDDING,
    "/api/show": Kind.INFO,
}
_PASS_HEADERS = ("Accept", "X-Request-Id", "User-Agent")
_HTTP_UNAVAILABLE = 503
_UPSTREAM_GONE = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)


class GatewayError(Exception):
    """The gateway cannot start (port taken, key file unreadable): the message says which."""


@dataclass
class Stats:
    """Counters for metrics and the closing figures of a benchmark."""

    requests: int = 0
    retries: int = 0
    fallbacks: int = 0
    refused: int = 0
    upstream_failed: int = 0
    mid_stream_failures: int = 0
    client_disconnects: int = 0
    by_status: dict[int, int] = field(default_factory=dict)


def read_api_keys(path: Path | None) -> frozenset[str]:
    """Keys from ``path``, one per line (``#`` comments, blank lines ignored); none if unset."""
    if path is None:
        return frozenset()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise GatewayError(
            f"gateway.api_keys_file {str(path)!r} cannot be read ({exc.strerror}); "
            "create it with one key per line, or unset the key to allow requests without one"
        ) from None
    keys = frozenset(
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    )
    if not keys:
        raise GatewayError(
            f"gateway.api_keys_file {str(path)!r} holds no key; every request would be refused"
        )
    return keys


class Gateway:
    """The aiohttp application, its upstream client session, and the in-flight counts."""

    def __init__(
        self, cfg: FleetConfig, fleet: Fleet, bus: EventBus, inflight: Inflight | None = None
    ) -> None:
        self.inflight = inflight or Inflight()
        self.stats = Stats()
        self.port: int | None = None
        self._fleet = fleet
        self._bus = bus
        self._spec: GatewaySpec = cfg.gateway
        self._table = RouteTable(cfg)
        self._cfg = cfg
        self._keys = read_api_keys(cfg.gateway.api_keys_file)
        self._upstream_key = cfg.engines.vllm.env.get("VLLM_API_KEY")
        self._turn = itertools.count()
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def set_config(self, cfg: FleetConfig) -> None:
        """Adopt a reloaded config (names, rules, keys); host and port need a restart."""
        try:
            keys = read_api_keys(cfg.gateway.api_keys_file)
        except GatewayError as exc:
            self._bus.emit("gateway.reload_failed", f"{exc}; keeping the previous keys")
        else:
            self._keys = keys
        self._cfg = cfg
        self._spec = cfg.gateway
        self._table = RouteTable(cfg)
        self._upstream_key = cfg.engines.vllm.env.get("VLLM_API_KEY")

    async def start(self) -> None:
        """Bind host:port and serve; GatewayError names the problem if that fails."""
        spec = self._spec
        app = web.Application(client_max_size=int(spec.max_request_mib * 1024 * 1024))
        app.router.add_get("/", self._root)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._openai_models)
        app.router.add_get("/v1/models/{model:.+}", self._openai_model)
        app.router.add_get("/api/tags", self._ollama_tags)
        app.router.add_get("/api/version", self._ollama_version)
        for path in _OPENAI_POSTS:
            app.router.add_post(path, self._openai_post)
        for path in _OLLAMA_POSTS:
            app.router.add_post(path, self._ollama_post)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30.0),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )
        # handler_cancellation: a client that goes away cancels its handler, which closes the
        # upstream connection, which makes vLLM and Ollama abort the generation
        runner = web.AppRunner(
            app,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=spec.drain_timeout_s,
        )
        await runner.setup()
        site = web.TCPSite(runner, spec.host, spec.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            await self._session.close()
            raise GatewayError(
                f"gateway cannot listen on {spec.host}:{spec.port}: {exc.strerror}; "
                "free the port or change [gateway] port (or set enabled = false)"
            ) from None
        self._runner = runner
        self.port = int(runner.addresses[0][1]) if runner.addresses else spec.port
        self._bus.emit(
            "gateway.listening",
            f"gateway at http://{spec.host}:{self.port}/v1 (Ollama API at /api)",
            host=spec.host,
            port=self.port,
        )

    async def stop(self) -> None:
        """Stop accepting; let in-flight requests finish within gateway.drain_timeout_s."""
        if self._runner is not None:
            busy = self.inflight.total()
            if busy:
                self._bus.emit(
                    "gateway.draining",
                    f"gateway closing: waiting for {busy} request(s) in flight "
                    f"(at most {self._spec.drain_timeout_s:g} s)",
                    in_flight=busy,
                )
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def status_json(self) -> GatewayJson:
        """Address and counters for `fleetctl status` (GET /v1/status on the control socket)."""
        s = self.stats
        return {
            "url": f"http://{self._spec.host}:{self.port}/v1",
            "in_flight": self.inflight.total(),
            "requests": s.requests,
            "retries": s.retries,
            "fallbacks": s.fallbacks,
            "refused": s.refused,
            "upstream_failed": s.upstream_failed,
            "mid_stream_failures": s.mid_stream_failures,
            "client_disconnects": s.client_disconnects,
        }

    # -- small endpoints --------------------------------------------------------------------
    async def _root(self, _request: web.Request) -> web.Response:
        return web.Response(text="fleetd gateway is running\n")

    async def _health(self, _request: web.Request) -> web.Response:
        ready = self._fleet(self.inflight)
        return web.json_response(
            {
                "status": "ok" if ready else "no_ready_worker",
                "ready": sorted({r.model for r in ready}),
                "in_flight": self.inflight.total(),
            },
            status=200 if ready else _HTTP_UNAVAILABLE,
        )

    async def _not_found(self, request: web.Request) -> web.Response:
        api = Api.OLLAMA if request.path.startswith("/api/") else Api.OPENAI
        return errors.response(
            api,
            404,
            "not_found",
            f"{request.method} {request.path} is not a gateway endpoint; see "
            "/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, "
            "/api/chat, /api/generate, /api/embed, /api/tags",
        )

    def _model_entries(self) -> list[dict[str, object]]:
        ready = self._fleet(self.inflight)
        ready_count: dict[str, int] = {}
        for replica in ready:
            ready_count[replica.model] = ready_count.get(replica.model, 0) + 1
        created = int(time.time())
        out: list[dict[str, object]] = [
            {
                "id": self._table.auto,
                "object": "model",
                "created": created,
                "owned_by": "fleetd",
                "fleetd": {"auto": True, "ready_models": sorted(ready_count)},
            }
        ]
        for spec in self._cfg.models:
            names = dict.fromkeys((spec.name, spec.served, *spec.aliases))
            out.extend(
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "fleetd",
                    "fleetd": {
                        "model": spec.name,
                        "engine": spec.engine.value,
                        "capabilities": [c.value for c in spec.capabilities],
                        "ready_replicas": ready_count.get(spec.name, 0),
                        "fallbacks": list(spec.fallbacks),
                    },
                }
                for name in names
            )
        return out

    async def _openai_models(self, request: web.Request) -> web.Response:
        if (denied := self._deny(request, Api.OPENAI)) is not None:
            return denied
        return web.json_response({"object": "list", "data": self._model_entries()})

    async def _openai_model(self, request: web.Request) -> web.Response:
        if (denied := self._deny(request, Api.OPENAI)) is not None:
            return denied
        wanted = request.match_info["model"]
        for entry in self._model_entries():
            if entry["id"] == wanted:
                return web.json_response(entry)
        return errors.response(
            Api.OPENAI,
            404,
            "model_not_found",
            f"model {wanted!r} is not served by this fleet; known: {self._table.known()}",
        )

    async def _ollama_tags(self, request: web.Request) -> web.Response:
        """Ollama's model list, from the ready Ollama servers, under the fleet's names."""
        if (denied := self._deny(request, Api.OLLAMA)) is not None:
            return denied
        ready = [r for r in self._fleet(self.inflight) if r.engine is Engine.OLLAMA]
        listed: dict[str, dict[str, object]] = {}
        for base_url in sorted({r.base_url for r in ready}):
            upstream = await self._get_json(f"{base_url}/api/tags")
            for entry in upstream.get("models", []) if isinstance(upstream, dict) else []:
                if isinstance(entry, dict):
                    listed.setdefault(str(entry.get("model", entry.get("name"))), entry)
        models: list[dict[str, object]] = []
        for replica in sorted(ready, key=lambda r: r.model):
            entry = listed.get(replica.upstream_model)
            if entry is not None and all(m["name"] != replica.model for m in models):
                models.append({**entry, "name": replica.model, "model": replica.model})
        return web.json_response({"models": models})

    async def _ollama_version(self, request: web.Request) -> web.Response:
        if (denied := self._deny(request, Api.OLLAMA)) is not None:
            return denied
        ready = [r for r in self._fleet(self.inflight) if r.engine is Engine.OLLAMA]
        for base_url in sorted({r.base_url for r in ready}):
            upstream = await self._get_json(f"{base_url}/api/version")
            if isinstance(upstream, dict):
                return web.json_response(upstream)
        return errors.response(
            Api.OLLAMA, _HTTP_UNAVAILABLE, "model_not_ready", "no Ollama server is ready"
        )

    async def _get_json(self, url: str) -> object:
        assert self._session is not None
        try:
            async with self._session.get(
                url, timeout=aiohttp.ClientTimeout(total=self._spec.connect_timeout_s + 3.0)
            ) as resp:
                return await resp.json(content_type=None) if resp.status == 200 else None
        except (*_UPSTREAM_GONE, TimeoutError, ValueError):
            return None

    # -- the proxy --------------------------------------------------------------------------
    async def _openai_post(self, request: web.Request) -> web.StreamResponse:
        return self._count(await self._proxy(request, Api.OPENAI, _OPENAI_POSTS[request.path]))

    async def _ollama_post(self, request: web.Request) -> web.StreamResponse:
        return self._count(await self._proxy(request, Api.OLLAMA, _OLLAMA_POSTS[request.path]))

    def _count(self, resp: web.StreamResponse) -> web.StreamResponse:
        by_status = self.stats.by_status
        by_status[resp.status] = by_status.get(resp.status, 0) + 1
        return resp

    def counters(self) -> GatewayCounters:
        """The counters, for the Prometheus exporter."""
        s = self.stats
        return GatewayCounters(
            requests=s.requests,
            in_flight=self.inflight.total(),
            by_status=dict(s.by_status),
            problems={
                "retry": s.retries,
                "fallback": s.fallbacks,
                "refused": s.refused,
                "upstream_failed": s.upstream_failed,
                "mid_stream_failure": s.mid_stream_failures,
                "client_disconnect": s.client_disconnects,
            },
        )

    def _deny(self, request: web.Request, api: Api) -> web.Response | None:
        """A 401 unless API keys are off or the request carries one of them."""
        if not self._keys:
            return None
        auth = request.headers.get("Authorization", "")
        scheme, _, key = auth.partition(" ")
        key = key.strip() if scheme.lower() == "bearer" else ""
        if key and any(hmac.compare_digest(key, k) for k in self._keys):
            return None
        self.stats.refused += 1
        return errors.response(
            api,
            401,
            "invalid_api_key",
            "missing or unknown API key: send `Authorization: Bearer <key>` with a key from "
            "gateway.api_keys_file",
            headers={"WWW-Authenticate": "Bearer"},
        )

    async def _read_body(self, request: web.Request, api: Api) -> dict[str, object] | web.Response:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return errors.response(
                api,
                413,
                "request_too_large",
                f"request body is over gateway.max_request_mib = {self._spec.max_request_mib:g} "
                "MiB; send smaller images or raise the limit",
            )
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            return errors.response(
                api, 400, "invalid_json", f"request body is not valid JSON: {exc}"
            )
        if not isinstance(body, dict):
            return errors.response(api, 400, "invalid_json", "request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return errors.response(
                api,
                400,
                "model_required",
                "`model` is required: a model name, an alias, or "
                f'"{self._table.auto}" to let the gateway choose ({self._table.known()})',
            )
        return body

    async def _proxy(self, request: web.Request, api: Api, kind: Kind) -> web.StreamResponse:
        self.stats.requests += 1
        if (denied := self._deny(request, api)) is not None:
            return denied
        body = await self._read_body(request, api)
        if isinstance(body, web.Response):
            self.stats.refused += 1
            return body
        req = inspect(body, api=api, kind=kind, task=request.headers.get(self._spec.task_header))
        decision = route(req, self._table, self._fleet(self.inflight), tiebreak=next(self._turn))
        if isinstance(decision, NoRoute):
            self.stats.refused += 1
            return errors.response(api, decision.status, decision.code, decision.message)
        stream = _wants_stream(body, api, kind)
        tried: list[str] = []
        for replica in decision.candidates:
            if tried:
                self.stats.retries += 1
            result = await self._attempt(request, api, body, decision, replica, stream=stream)
            if isinstance(result, str):
                tried.append(f"{replica.worker}: {result}")
                continue
            return result
        self.stats.upstream_failed += 1
        return errors.response(
            api,
            502,
            "upstream_unavailable",
            f"every ready replica failed before answering ({'; '.join(tried)}); "
            "the supervisor restarts failed workers: retry shortly",
        )

    async def _attempt(  # noqa: PLR0911 - each way out says why
        self,
        request: web.Request,
        api: Api,
        body: dict[str, object],
        decision: Route,
        replica: Replica,
        *,
        stream: bool,
    ) -> web.StreamResponse | str:
        """Send to one replica. A string says why it failed before any byte went out."""
        assert self._session is not None
        payload = json.dumps({**body, "model": replica.upstream_model}).encode()
        headers = {"Content-Type": "application/json"}
        for name in _PASS_HEADERS:
            if name in request.headers:
                headers[name] = request.headers[name]
        if replica.engine is Engine.VLLM and self._upstream_key:
            headers["Authorization"] = f"Bearer {self._upstream_key}"
        timeout = aiohttp.ClientTimeout(
            total=self._spec.request_timeout_s, sock_connect=self._spec.connect_timeout_s
        )
        with self.inflight.track(replica.target):
            try:
                upstream = await self._session.post(
                    replica.base_url + request.path, data=payload, headers=headers, timeout=timeout
                )
            except _UPSTREAM_GONE as exc:
                return _why(exc)
            except TimeoutError:
                return "timed out before answering"
            async with upstream:
                if upstream.status == _HTTP_UNAVAILABLE:
                    return f"503 {(await _safe_text(upstream))[:200]}"
                out_headers = self._headers(decision, replica, upstream)
                if not stream or upstream.status != 200:
                    try:
                        data = await upstream.read()
                    except _UPSTREAM_GONE as exc:
                        return _why(exc)
                    except TimeoutError:
                        return "timed out"
                    return web.Response(status=upstream.status, body=data, headers=out_headers)
                return await self._pipe(request, api, upstream, out_headers)

    def _headers(
        self, decision: Route, replica: Replica, upstream: aiohttp.ClientResponse
    ) -> dict[str, str]:
        out = {
            "Content-Type": upstream.headers.get("Content-Type", "application/json"),
            "X-Fleetd-Model": replica.model,
            "X-Fleetd-Worker": replica.worker,
            "X-Fleetd-Route": decision.why,
        }
        fallback = decision.fallback(replica)
        if fallback is not None:
            out["X-Fleetd-Fallback"] = fallback
            self.stats.fallbacks += 1
        return out

    async def _pipe(
        self,
        request: web.Request,
        api: Api,
        upstream: aiohttp.ClientResponse,
        headers: dict[str, str],
    ) -> web.StreamResponse | str:
        """Stream the body through; the first chunk is awaited before the client sees a byte."""
        chunks = upstream.content.iter_any()
        try:
            first = await anext(chunks, b"")
        except _UPSTREAM_GONE as exc:
            return _why(exc)
        except TimeoutError:
            return "timed out before the first byte"
        resp = web.StreamResponse(status=upstream.status, headers=headers)
        resp.headers["Cache-Control"] = "no-cache"
        try:
            await resp.prepare(request)
            if first:
                await resp.write(first)
            while True:
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except _UPSTREAM_GONE as exc:
                    self.stats.mid_stream_failures += 1
                    await resp.write(errors.stream_event(api, "upstream_lost", _lost(exc)))
                    break
                except TimeoutError:
                    self.stats.mid_stream_failures += 1
                    limit = self._spec.request_timeout_s
                    text = f"gateway.request_timeout_s ({limit:g} s) ran out mid-stream"
                    await resp.write(errors.stream_event(api, "timeout", text))
                    break
                await resp.write(chunk)  # waits while the client is slow: backpressure
            await resp.write_eof()
        except ConnectionResetError:  # the client went away (aiohttp's reset error too)
            self.stats.client_disconnects += 1
        except asyncio.CancelledError:
            self.stats.client_disconnects += 1
            raise
        return resp


def _wants_stream(body: dict[str, object], api: Api, kind: Kind) -> bool:
    if kind in (Kind.EMBEDDING, Kind.INFO):
        return False
    if api is Api.OPENAI:
        return body.get("stream") is True
    return body.get("stream", True) is not False  # Ollama streams unless told not to


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _lost(exc: BaseException) -> str:
    return (
        f"the engine serving this request stopped mid-stream ({_why(exc)}); the output so far "
        "is incomplete: retry the request (the gateway routes it to a ready replica)"
    )


async def _safe_text(resp: aiohttp.ClientResponse) -> str:
    try:
        return await resp.text()
    except (*_UPSTREAM_GONE, TimeoutError, UnicodeDecodeError):
        return ""
