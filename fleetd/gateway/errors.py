"""Errors in each API's own shape, so unchanged clients raise their usual exceptions.

OpenAI clients expect ``{"error": {"message", "type", "param", "code"}}`` (the ``openai``
package raises ``APIStatusError`` subclasses from it, and ``APIError`` from such an object
sent as an SSE event mid-stream); Ollama clients expect ``{"error": "..."}`` (the ``ollama``
package raises ``ResponseError``, also for such a line inside an NDJSON stream).
"""

from __future__ import annotations

import json

from aiohttp import web

from fleetd.gateway.routing import Api

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def _openai_body(status: int, code: str, message: str) -> dict[str, object]:
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def response(
    api: Api, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """A complete error response in ``api``'s shape."""
    body = _openai_body(status, code, message) if api is Api.OPENAI else {"error": message}
    return web.json_response(body, status=status, headers=headers)


def stream_event(api: Api, code: str, message: str) -> bytes:
    """An error to append to a stream already under way (SSE event or NDJSON line)."""
    if api is Api.OPENAI:
        return b"data: " + json.dumps(_openai_body(502, code, message)).encode() + b"\n\n"
    return json.dumps({"error": message}).encode() + b"\n"
