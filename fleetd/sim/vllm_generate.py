"""``/v1/chat/completions`` and ``/v1/completions`` of the emulated vLLM API server.

Non-streaming replies are one JSON body; streams are SSE (``data: <json>`` + blank line) ending with
``data: [DONE]`` whatever happens (reference A.4): an aborted request ends with an empty delta
and ``finish_reason: "abort"``, a dead engine with an in-band ``{"error": ...}`` event.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from fleetd.sim import vllm_openai
from fleetd.sim.vllm_openai import ApiError
from fleetd.sim.vllm_sched import DEAD_MESSAGE, Interrupted, Job, Refused
from fleetd.sim.vllm_state import STATE, ServerState, compact, error, internal, json_body

if TYPE_CHECKING:
    from fleetd.sim.vllm_openai import GenRequest


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions."""
    return await _generate(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions."""
    return await _generate(request, chat=False)


async def _generate(request: web.Request, *, chat: bool) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        body = await request.json()
    except ValueError as exc:
        return error(
            vllm_openai.bad_request(
                f"[{{'type': 'json_invalid', 'loc': ('body', 0), 'msg': 'JSON decode error', "
                f"'ctx': {{'error': '{exc}'}}}}]"
            )
        )
    try:
        req = vllm_openai.parse(body, state.args, chat=chat, max_model_len=state.max_model_len)
        state.scheduler.check_admission()
    except ApiError as exc:
        return error(exc)
    except Refused as exc:
        return internal(exc.message)
    job = Job(req.prompt_tokens, list(req.tokens), req.finish_reason)
    tracking = state.args.enable_server_load_tracking
    state.server_load += tracking
    try:
        if req.stream:
            return await _stream(request, state, req, job)
        return await _complete(state, req, job)
    finally:
        state.server_load -= tracking


async def _complete(state: ServerState, req: GenRequest, job: Job) -> web.Response:
    finish, stop = req.finish_reason, req.stop_reason
    try:
        async with contextlib.aclosing(state.scheduler.generate(job)) as tokens:
            async for _ in tokens:
                pass
    except Interrupted as exc:
        if exc.reason == "error":
            return internal(DEAD_MESSAGE)
        finish, stop = "abort", None
    except Refused as exc:
        return internal(exc.message)
    body = vllm_openai.full_response(
        req,
        rid=vllm_openai.new_id(req.chat),
        model=state.args.name,
        text="".join(job.tokens[: job.generated]),
        finish=finish,
        stop=stop,
        n=job.generated,
    )
    return json_body(body)


async def _stream(
    request: web.Request, state: ServerState, req: GenRequest, job: Job
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
    await response.prepare(request)
    meta: dict[str, Any] = {
        "rid": vllm_openai.new_id(req.chat),
        "created": int(time.time()),
        "model": state.args.name,
    }

    async def send(event: dict[str, Any], *, in_band_error: bool = False) -> None:
        data = json.dumps(event) if in_band_error else compact(event)
        await response.write(f"data: {data}\n\n".encode())

    sent = 0
    with contextlib.suppress(ConnectionError):  # client gone: aclosing() aborts the job
        if req.chat:
            await send(vllm_openai.chunk(req, **meta, content=None, role=True))
        try:
            async with contextlib.aclosing(state.scheduler.generate(job)) as tokens:
                async for token in tokens:
                    sent += 1
                    last = sent == len(job.tokens)
                    await send(
                        vllm_openai.chunk(
                            req,
                            **meta,
                            content=token,
                            finish=req.finish_reason if last else None,
                            stop=req.stop_reason if last else None,
                        )
                    )
            if not job.tokens:
                await send(
                    vllm_openai.chunk(
                        req, **meta, content="", finish=req.finish_reason, stop=req.stop_reason
                    )
                )
        except Interrupted as exc:
            if exc.reason == "abort":
                await send(vllm_openai.chunk(req, **meta, content="", finish="abort"))
            else:
                await send(
                    ApiError(500, "InternalServerError", DEAD_MESSAGE).body(), in_band_error=True
                )
        except Refused as exc:
            await send(ApiError(500, "InternalServerError", exc.message).body(), in_band_error=True)
        if req.include_usage:
            await send(vllm_openai.usage_chunk(req, **meta, n=sent))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    return response
