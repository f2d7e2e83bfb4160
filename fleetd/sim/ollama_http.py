"""What the emulated Ollama's HTTP routes share: app state, parsing, errors, fake generation.

Shapes and messages follow Ollama v0.33 (``server/routes.go``, ``api/types.go``):
``{"error": ...}`` bodies, compact JSON, nanosecond metrics, RFC 3339 times. Generated text is
fake (``fleetd.sim.common.fake_tokens``), paced at FLEETD_SIM_TOKEN_S per token. No routes here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import math
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from fleetd.sim import common
from fleetd.sim import ollama_models as om
from fleetd.sim import ollama_sched as sched
from fleetd.sim.ollama_env import DurationError, OllamaEnv, keep_alive_from_json

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

ERR_NO_VISION = "this model is missing data required for image input"
ERR_NO_EMBEDDINGS = "this model does not support embeddings"


class Switches:
    """Run-time fault switches: a hung server accepts connections and never answers."""

    def __init__(self) -> None:
        self.hung = False

    def hang(self) -> None:
        """SIGUSR1 or hang_after_s: stop answering from now on."""
        self.hung = True

    async def gate(self) -> None:
        """Return at once, or never while hung (until the task is cancelled)."""
        if self.hung:
            await asyncio.Event().wait()


SCHED = web.AppKey("sched", sched.Scheduler)
CATALOGUE = web.AppKey("catalogue", om.Catalogue)
SETTINGS = web.AppKey("settings", OllamaEnv)
SWITCHES = web.AppKey("switches", Switches)


class RequestError(Exception):
    """A request Ollama refuses before scheduling: status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def dumps(obj: object) -> str:
    """JSON as Go's encoding/json writes it: no spaces, non-ASCII kept."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def reply(obj: object, status: int = 200) -> web.Response:
    """A JSON response (application/json; charset=utf-8, as gin's c.JSON)."""
    return web.json_response(obj, status=status, dumps=dumps)


def error(status: int, message: str) -> web.Response:
    """Ollama's error body."""
    return reply({"error": message}, status=status)


def go_time(dt: datetime) -> str:
    """time.Time as Go's JSON marshals it: RFC 3339, trimmed fraction, Z for UTC."""
    text = dt.strftime("%Y-%m-%dT%H:%M:%S")
    if dt.microsecond:
        text += f".{dt.microsecond:06d}".rstrip("0")
    offset = dt.utcoffset()
    if offset is None or not offset:
        return text + "Z"
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    return f"{text}{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def utc_now() -> str:
    """created_at: now in UTC."""
    return go_time(datetime.now(UTC))


def ns(seconds: float) -> int:
    """A duration in nanoseconds, as every Ollama metric is."""
    return int(seconds * 1e9)


async def read_body(request: web.Request) -> dict[str, Any]:
    """The JSON object of a request; Go-like messages for a missing or bad body."""
    raw = await request.read()
    if not raw.strip():
        raise RequestError(400, "missing request body")
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        pos = getattr(exc, "pos", len(raw))
        if pos >= len(raw.rstrip()):
            raise RequestError(400, "unexpected EOF") from None
        char = raw.decode(errors="replace")[pos]
        raise RequestError(
            400, f"invalid character '{char}' looking for beginning of value"
        ) from None
    if not isinstance(doc, dict):
        raise RequestError(400, f"json: cannot unmarshal {type(doc).__name__} into Go value")
    return doc


def find_model(app: web.Application, body: dict[str, Any]) -> tuple[str, om.ModelSpec]:
    """The requested name (echoed in responses) and its pulled model; 400/404 otherwise."""
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RequestError(400, "model is required")
    spec = app[CATALOGUE].lookup(name)
    if spec is None:
        raise RequestError(404, f"model '{name}' not found")
    return name, spec


def int_option(options: dict[str, Any], key: str) -> int | None:
    """An integer runner option (num_ctx, num_gpu, num_predict); floats are truncated as in Go."""
    value = options.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(400, f"option {key!r} must be a number")
    return int(value)


def load_request(spec: om.ModelSpec, body: dict[str, Any]) -> tuple[sched.LoadRequest, int | None]:
    """Scheduler request plus num_predict, from ``options`` and ``keep_alive``."""
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise RequestError(400, "options must be an object")
    keep = body.get("keep_alive")
    try:
        keep_alive_s = None if keep is None else keep_alive_from_json(keep)
    except DurationError as exc:
        raise RequestError(400, str(exc)) from None
    req = sched.LoadRequest(
        spec,
        num_ctx=int_option(options, "num_ctx"),
        num_gpu=int_option(options, "num_gpu"),
        keep_alive_s=keep_alive_s,
    )
    return req, int_option(options, "num_predict")


def check_images(spec: om.ModelSpec, images: object) -> bool:
    """Whether there are images; 400 if malformed or the model has no vision."""
    if images is None:
        return False
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise RequestError(400, "images must be a list of base64 strings")
    for img in images:
        try:
            base64.b64decode(img, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, "illegal base64 data in images") from None
    if images and not spec.has("vision"):
        raise RequestError(400, ERR_NO_VISION)
    return bool(images)


async def acquire(app: web.Application, req: sched.LoadRequest) -> sched.Runner:
    """A runner, or RequestError carrying the scheduler's status and message."""
    try:
        return await app[SCHED].acquire(req)
    except sched.ScheduleError as exc:
        raise RequestError(exc.status, exc.message) from None


def plan_tokens(prompt: str, num_predict: int | None) -> tuple[list[str], str]:
    """The reply: 16-31 words then "stop"; exactly num_predict words then "length" if set."""
    if num_predict is not None and num_predict >= 0:
        return common.fake_tokens(prompt, num_predict), "length"
    natural = 16 + hashlib.sha256(prompt.encode()).digest()[0] % 16
    return common.fake_tokens(prompt, natural), "stop"


def count_tokens(text: str) -> int:
    """Prompt tokens: one per word, at least one (the template adds some)."""
    return max(1, len(text.split()))


async def paced(app: web.Application, tokens: list[str]) -> AsyncIterator[str]:
    """Tokens at FLEETD_SIM_TOKEN_S each; a hung server stops mid-stream."""
    delay = app[SETTINGS].token_s
    for token in tokens:
        await app[SWITCHES].gate()
        if delay > 0:
            await asyncio.sleep(delay)
        yield token


def metrics(
    *, t0: float, load_s: float, prompt: str, eval_count: int, eval_s: float, token_s: float
) -> dict[str, int]:
    """The final object's metrics (ns); zero values are left out, like Go's omitempty."""
    prompt_count = count_tokens(prompt)
    out = {
        "total_duration": ns(time.monotonic() - t0),
        "load_duration": ns(load_s),
        "prompt_eval_count": prompt_count,
        "prompt_eval_duration": ns(prompt_count * token_s / 10),
        "eval_count": eval_count,
        "eval_duration": ns(eval_s),
    }
    return {k: v for k, v in out.items() if v}


def embedding(text: str, dims: int) -> list[float]:
    """A deterministic unit vector for ``text``."""
    seed = hashlib.sha256(text.encode()).digest()
    raw = [((seed[i % 32] ^ (i * 31)) % 255) / 127.0 - 1.0 for i in range(dims)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [round(x / norm, 6) for x in raw]


def embed_inputs(raw: object) -> list[str]:
    """``input`` of an embedding request: a string or a list of strings."""
    if raw is None or raw == "":
        return []
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and all(isinstance(i, str) for i in raw):
        return list(raw)
    raise RequestError(400, "invalid input type")


def check_embedding(spec: om.ModelSpec) -> None:
    """Embedding routes need an embedding model."""
    if not spec.has("embedding"):
        raise RequestError(400, ERR_NO_EMBEDDINGS)
