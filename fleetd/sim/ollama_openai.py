"""The emulated Ollama's OpenAI-compatible routes (``/v1/*``), as ``middleware/openai.go``.

Same scheduler and fake text as the native API; only the shapes differ: SSE streams of
``chat.completion.chunk``/``text_completion`` objects ending with ``data: [DONE]``, errors as
``{"error": {"message", "type", "param", "code"}}``, ``system_fingerprint: "fp_ollama"``.
/v1 requests carry no keep_alive, so OLLAMA_KEEP_ALIVE applies to the models they load.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from fleetd.sim import ollama_http as oh
from fleetd.sim import ollama_sched as sched

if TYPE_CHECKING:
    from fleetd.sim import ollama_models as om

_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error"}


def oai_error(status: int, message: str) -> web.Response:
    """openai.NewError."""
    kind = _ERROR_TYPES.get(status, "api_error")
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return oh.reply(body, status=status)


def _owner(name: str) -> str:
    # model.ParseName(id).Namespace: "library" unless the name says otherwise
    parts = name.split(":", 1)[0].split("/")
    return parts[-2] if len(parts) >= 2 else "library"


def _model_entry(spec_name: str, created: int) -> dict[str, Any]:
    return {"id": spec_name, "object": "model", "created": created, "owned_by": _owner(spec_name)}


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models: pulled models, not loaded ones."""
    models = request.app[oh.CATALOGUE].models()
    data = [_model_entry(m.name, int(m.modified_at.timestamp())) for m in models]
    return oh.reply({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    """GET /v1/models/{model}."""
    name = request.match_info["model"]
    spec = request.app[oh.CATALOGUE].lookup(name)
    if spec is None:
        return oai_error(404, f"model '{name}' not found")
    return oh.reply(_model_entry(spec.name, int(spec.modified_at.timestamp())))


def _v1_messages(body: dict[str, Any]) -> tuple[str, bool, bool]:
    """Prompt text, whether images are attached, whether there are messages at all."""
    messages = body.get("messages") or []
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise oh.RequestError(400, "invalid message format")
    texts: list[str] = []
    images = False
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    raise oh.RequestError(400, "invalid message format")
                if part.get("type") == "image_url":
                    images = True
                elif isinstance(part.get("text"), str):
                    texts.append(part["text"])
    return " ".join(texts), images, bool(messages)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions."""
    return await _complete(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions."""
    return await _complete(request, chat=False)


@dataclass(frozen=True, slots=True)
class V1Job:
    """A parsed /v1 completion request."""

    name: str
    spec: om.ModelSpec
    prompt: str
    has_input: bool
    limit: int | None
    stream: bool
    include_usage: bool


def parse_v1(app: web.Application, body: dict[str, Any], *, chat: bool) -> V1Job:
    """Validate a /v1 completion request up to scheduling."""
    name, spec = oh.find_model(app, body)
    if chat:
        prompt, images, has_input = _v1_messages(body)
    else:
        prompt, images = body.get("prompt") or "", False
        if not isinstance(prompt, str):
            raise oh.RequestError(400, "invalid prompt: a string is required")
        has_input = bool(prompt)
    if images and not spec.has("vision"):
        raise oh.RequestError(400, oh.ERR_NO_VISION)
    if not spec.has("completion"):
        raise oh.RequestError(400, f'"{name}" does not support {"chat" if chat else "generate"}')
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
        raise oh.RequestError(400, "max_tokens must be an integer")
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return V1Job(name, spec, prompt, has_input, limit, body.get("stream") is True, include_usage)


async def _complete(request: web.Request, *, chat: bool) -> web.StreamResponse:
    app = request.app
    try:
        job = parse_v1(app, await oh.read_body(request), chat=chat)
        runner = await oh.acquire(app, sched.LoadRequest(job.spec))
    except oh.RequestError as exc:
        return oai_error(exc.status, exc.message)
    try:
        tokens, reason = oh.plan_tokens(job.prompt, job.limit) if job.has_input else ([], "load")
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.randbelow(999)}"
        head = {
            "id": ident,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": job.name,
            "system_fingerprint": "fp_ollama",
        }
        prompt_tokens = oh.count_tokens(job.prompt)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(tokens),
            "total_tokens": prompt_tokens + len(tokens),
        }
        if job.stream:
            return await _sse(request, head, tokens, reason, usage if job.include_usage else None)
        text = "".join([t async for t in oh.paced(app, tokens)])
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return oh.reply({**head, "choices": [choice], "usage": usage})
    finally:
        app[oh.SCHED].release(runner)


async def _sse(
    request: web.Request,
    head: dict[str, Any],
    tokens: list[str],
    reason: str,
    usage: dict[str, int] | None,
) -> web.StreamResponse:
    chat = head["object"] == "chat.completion"
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)

    async def send(payload: dict[str, Any] | str) -> None:
        data = payload if isinstance(payload, str) else oh.dumps(payload)
        await resp.write(f"data: {data}\n\n".encode())

    try:
        first = True
        async for token in oh.paced(request.app, tokens):
            if chat:
                delta = {"role": "assistant", "content": token} if first else {"content": token}
                first = False
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
            else:
                choice = {"text": token, "index": 0, "finish_reason": None}
            await send({**head, "choices": [choice]})
        last = {"index": 0, "delta": {}} if chat else {"text": "", "index": 0}
        await send({**head, "choices": [{**last, "finish_reason": reason}]})
        if usage is not None:
            await send({**head, "choices": [], "usage": usage})
        await send("[DONE]")
        await resp.write_eof()
    except ConnectionResetError:
        pass  # the client went away (or serve is closing)
    return resp


def _v1_embed_inputs(body: dict[str, Any], spec: om.ModelSpec) -> list[str]:
    inputs = oh.embed_inputs(body.get("input"))
    if not inputs:
        raise oh.RequestError(400, "invalid input")
    oh.check_embedding(spec)
    return inputs


async def embeddings(request: web.Request) -> web.Response:
    """POST /v1/embeddings."""
    app = request.app
    try:
        body = await oh.read_body(request)
        name, spec = oh.find_model(app, body)
        inputs = _v1_embed_inputs(body, spec)
        runner = await oh.acquire(app, sched.LoadRequest(spec))
    except oh.RequestError as exc:
        return oai_error(exc.status, exc.message)
    try:
        async for _ in oh.paced(app, inputs):
            pass
        data = [
            {
                "object": "embedding",
                "embedding": oh.embedding(text, spec.embedding_length),
                "index": i,
            }
            for i, text in enumerate(inputs)
        ]
        tokens = sum(map(oh.count_tokens, inputs))
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return oh.reply({"object": "list", "data": data, "model": name, "usage": usage})
    finally:
        app[oh.SCHED].release(runner)


def add_routes(app: web.Application) -> None:
    """Register /v1."""
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_post("/v1/embeddings", embeddings)
