"""The emulated Ollama's native HTTP API: ``/`` and ``/api/*``, as ``server/routes.go`` v0.33.

Generate and chat stream NDJSON by default (one object per line, ``done: true`` last, with the
nanosecond metrics), ``"stream": false`` gives one JSON object; an empty prompt or message list
loads the model (``done_reason: "load"``), with ``keep_alive: 0`` it unloads it at once
(``"unload"``). ``expires_at``/``modified_at`` carry the local offset, ``created_at`` is UTC.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from fleetd.sim import ollama_http as oh
from fleetd.sim import ollama_models as om
from fleetd.sim import ollama_sched as sched
from fleetd.sim.ollama_env import VERSION

NDJSON = "application/x-ndjson"


# -- handlers ---------------------------------------------------------------------------
async def root(_: web.Request) -> web.Response:
    """GET|HEAD /."""
    return web.Response(text="Ollama is running")


async def version(_: web.Request) -> web.Response:
    """GET|HEAD /api/version."""
    return oh.reply({"version": VERSION})


def details(spec: om.ModelSpec) -> dict[str, Any]:
    """api.ModelDetails."""
    return {
        "parent_model": "",
        "format": "gguf",
        "family": spec.family,
        "families": [spec.family],
        "parameter_size": spec.parameter_size,
        "quantization_level": spec.quantization_level,
    }


async def tags(request: web.Request) -> web.Response:
    """GET /api/tags: pulled models, newest first."""
    models = sorted(request.app[oh.CATALOGUE].models(), key=lambda m: m.modified_at, reverse=True)
    return oh.reply(
        {
            "models": [
                {
                    "name": m.name,
                    "model": m.name,
                    "modified_at": oh.go_time(m.modified_at.astimezone()),
                    "size": m.size_bytes,
                    "digest": m.digest,
                    "details": details(m),
                    "capabilities": list(m.capabilities),
                }
                for m in models
            ]
        }
    )


async def ps(request: web.Request) -> web.Response:
    """GET /api/ps: loaded models, longest remaining expiry first."""
    now = sched.local_now()
    rows = [(r, r.expires(now)) for r in request.app[oh.SCHED].loaded()]
    rows.sort(key=lambda row: int(row[1].timestamp()), reverse=True)
    return oh.reply(
        {
            "models": [
                {
                    "name": r.spec.name,
                    "model": r.spec.name,
                    "size": r.plan.total_bytes,
                    "digest": r.spec.digest,
                    "details": details(r.spec),
                    "expires_at": oh.go_time(expires),
                    "size_vram": r.plan.vram_bytes,
                    "context_length": r.plan.num_ctx,
                }
                for r, expires in rows
            ]
        }
    )


async def show(request: web.Request) -> web.Response:
    """POST /api/show: enough for a client to read capabilities and block_count."""
    try:
        _, spec = oh.find_model(request.app, await oh.read_body(request))
    except oh.RequestError as exc:
        return oh.error(exc.status, exc.message)
    arch = spec.architecture
    return oh.reply(
        {
            "license": "",
            "modelfile": f"FROM {spec.name}\n",
            "parameters": "",
            "template": "{{ .Prompt }}",
            "details": details(spec),
            "model_info": {
                "general.architecture": arch,
                "general.parameter_count": spec.parameter_count,
                f"{arch}.block_count": spec.layers,
                f"{arch}.context_length": spec.context_length,
                f"{arch}.embedding_length": spec.embedding_length,
            },
            "capabilities": list(spec.capabilities),
            "modified_at": oh.go_time(spec.modified_at.astimezone()),
        }
    )


async def generate(request: web.Request) -> web.StreamResponse:
    """POST /api/generate."""
    return await _complete(request, chat=False)


async def chat(request: web.Request) -> web.StreamResponse:
    """POST /api/chat."""
    return await _complete(request, chat=True)


@dataclass(frozen=True, slots=True)
class Job:
    """A parsed /api/generate or /api/chat request."""

    name: str  # as the client wrote it; echoed in every response
    spec: om.ModelSpec
    req: sched.LoadRequest
    num_predict: int | None
    prompt: str
    has_input: bool  # False: a preload (or, with keep_alive 0, an unload)
    stream: bool
    chat: bool


def parse_job(app: web.Application, body: dict[str, Any], *, chat: bool) -> Job:
    """Validate a completion request up to the point where Ollama schedules it."""
    name, spec = oh.find_model(app, body)
    req, num_predict = oh.load_request(spec, body)
    if chat:
        messages = body.get("messages") or []
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise oh.RequestError(400, "messages must be a list of objects")
        for message in messages:
            oh.check_images(spec, message.get("images"))
        prompt = " ".join(str(m.get("content") or "") for m in messages)
        has_input = bool(messages)
    else:
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            raise oh.RequestError(400, "prompt must be a string")
        oh.check_images(spec, body.get("images"))
        has_input = bool(prompt)
    stream = body.get("stream", True) is not False
    return Job(name, spec, req, num_predict, prompt, has_input, stream, chat)


def check_capable(job: Job, body: dict[str, Any]) -> None:
    """Capability checks of scheduleRunner (after the unload shortcut, as in routes.go)."""
    if not job.spec.has("completion"):
        verb = "chat" if job.chat else "generate"
        raise oh.RequestError(400, f'"{job.name}" does not support {verb}')
    if body.get("think") not in (None, False) and not job.spec.has("thinking"):
        raise oh.RequestError(400, f'"{job.name}" does not support thinking')


def _final(job: Job, reason: str, text: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"model": job.name, "created_at": oh.utc_now()}
    if job.chat:
        out["message"] = {"role": "assistant", "content": text}
    else:
        out["response"] = text
    out.update(done=True, done_reason=reason)
    return out


async def _complete(request: web.Request, *, chat: bool) -> web.StreamResponse:
    t0 = time.monotonic()
    app = request.app
    try:
        body = await oh.read_body(request)
        job = parse_job(app, body, chat=chat)
    except oh.RequestError as exc:
        return oh.error(exc.status, exc.message)
    if not job.has_input and job.req.keep_alive_s == 0:
        app[oh.SCHED].expire_model(job.spec)  # routes.go: answer at once, unload asynchronously
        return oh.reply(_final(job, "unload"))
    try:
        check_capable(job, body)
        runner = await oh.acquire(app, job.req)
    except oh.RequestError as exc:
        return oh.error(exc.status, exc.message)
    try:
        if not job.has_input:
            return oh.reply(_final(job, "load"))
        return await _reply(request, job, t0=t0, load_s=time.monotonic() - t0)
    finally:
        app[oh.SCHED].release(runner)


async def _reply(request: web.Request, job: Job, *, t0: float, load_s: float) -> web.StreamResponse:
    app = request.app
    tokens, reason = oh.plan_tokens(job.prompt, job.num_predict)
    final = _final(job, reason)
    if not job.chat:
        words = (*job.prompt.split(), *tokens)
        final["context"] = [
            int.from_bytes(hashlib.sha256(w.encode()).digest()[:2]) % 32000 for w in words
        ]
    started = time.monotonic()

    def finish(text: str) -> dict[str, Any]:
        final["created_at"] = oh.utc_now()
        if text:
            final["message" if job.chat else "response"] = (
                {"role": "assistant", "content": text} if job.chat else text
            )
        eval_s = time.monotonic() - started
        final.update(
            oh.metrics(
                t0=t0,
                load_s=load_s,
                prompt=job.prompt,
                eval_count=len(tokens),
                eval_s=eval_s,
                token_s=app[oh.SETTINGS].token_s,
            )
        )
        return final

    if not job.stream:
        return oh.reply(finish("".join([t async for t in oh.paced(app, tokens)])))
    resp = web.StreamResponse(headers={"Content-Type": NDJSON})
    await resp.prepare(request)
    try:
        async for token in oh.paced(app, tokens):
            chunk: dict[str, Any] = {"model": job.name, "created_at": oh.utc_now()}
            if job.chat:
                chunk["message"] = {"role": "assistant", "content": token}
            else:
                chunk["response"] = token
            chunk["done"] = False
            await resp.write(oh.dumps(chunk).encode() + b"\n")
        await resp.write(oh.dumps(finish("")).encode() + b"\n")
        await resp.write_eof()
    except ConnectionResetError:
        pass  # the client went away (or serve is closing): nothing left to tell it
    return resp


async def embed(request: web.Request) -> web.Response:
    """POST /api/embed; an empty input only loads the model."""
    t0 = time.monotonic()
    app = request.app
    try:
        body = await oh.read_body(request)
        name, spec = oh.find_model(app, body)
        inputs = oh.embed_inputs(body.get("input"))
        oh.check_embedding(spec)
        req, _ = oh.load_request(spec, body)
        runner = await oh.acquire(app, req)
    except oh.RequestError as exc:
        return oh.error(exc.status, exc.message)
    try:
        load_s = time.monotonic() - t0
        if not inputs:
            return oh.reply({"model": name, "embeddings": []})
        async for _ in oh.paced(app, inputs):
            pass
        vectors = [oh.embedding(text, spec.embedding_length) for text in inputs]
        return oh.reply(
            {
                "model": name,
                "embeddings": vectors,
                "total_duration": oh.ns(time.monotonic() - t0),
                "load_duration": oh.ns(load_s),
                "prompt_eval_count": sum(map(oh.count_tokens, inputs)),
            }
        )
    finally:
        app[oh.SCHED].release(runner)


def add_routes(app: web.Application) -> None:
    """Register the native API (GET routes answer HEAD too)."""
    app.router.add_get("/", root)
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/ps", ps)
    app.router.add_post("/api/show", show)
    app.router.add_post("/api/generate", generate)
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/embed", embed)
