"""What the emulated API server's HTTP handlers share, and vLLM's JSON response shapes.

FastAPI's JSONResponse writes compact JSON (``{"a":1}``), so every body here does too.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from fleetd.sim.vllm_openai import ApiError

if TYPE_CHECKING:
    from fleetd.sim.vllm_args import ServeArgs
    from fleetd.sim.vllm_client import EngineCoreClient
    from fleetd.sim.vllm_log import VllmLog
    from fleetd.sim.vllm_metrics import Metrics
    from fleetd.sim.vllm_sched import Scheduler

SEP = (",", ":")  # vLLM serializes chunks compactly (pydantic), mid-stream errors with json.dumps


@dataclass
class ServerState:
    """What the HTTP layer and the lifecycle share."""

    args: ServeArgs
    max_model_len: int
    scheduler: Scheduler
    metrics: Metrics
    engine: EngineCoreClient
    out: VllmLog
    dev_mode: bool = False
    dead: bool = False
    sleep_level: int = 0
    server_load: int = 0
    hang_forever: asyncio.Event = field(default_factory=asyncio.Event)
    sleep_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    created: int = field(default_factory=lambda: int(time.time()))


STATE = web.AppKey("state", ServerState)


def json_body(data: object, *, status: int = 200) -> web.Response:
    """JSON as FastAPI's JSONResponse writes it: compact separators."""
    return web.json_response(data, status=status, dumps=compact)


def compact(data: object) -> str:
    """Compact JSON text."""
    return json.dumps(data, separators=SEP)


def error(exc: ApiError) -> web.Response:
    """The error body vLLM sends, with its status."""
    return json_body(exc.body(), status=exc.status)


def internal(message: str) -> web.Response:
    """A 500 InternalServerError body."""
    return error(ApiError(500, "InternalServerError", message))
