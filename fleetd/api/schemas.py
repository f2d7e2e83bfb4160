"""The control API's wire format, shared by the daemon and fleetctl.

Plain TypedDicts (no pydantic here): fleetctl imports this module and must start in well
under 150 ms, so nothing heavy may be imported. The daemon validates requests against these
shapes in ``fleetd.api.validate``; every response is one of the shapes below, and every
error is ``ErrorBody`` with a stable ``code`` scripts can rely on.

Routes (all JSON, HTTP/1.1 over the Unix socket; version prefix ``/v1``):

    GET  /v1/status                          -> Status
    GET  /v1/models/{model}/explain          -> Explain
    POST /v1/models/{model}/scale            ScaleRequest -> ActionResult
    POST /v1/drain                           DrainRequest -> ActionResult
    POST /v1/undrain                         DrainRequest (target + name) -> ActionResult
    POST /v1/gpus/{gpu}/cordon               {} -> ActionResult      (gpu: index or UUID)
    POST /v1/gpus/{gpu}/uncordon             {} -> ActionResult
    POST /v1/workers/{worker}/restart        {} -> ActionResult
    POST /v1/reload                          {} -> ActionResult      (validates first)
    GET  /v1/events?since=SEQ&follow=0|1&kind=PREFIX  -> NDJSON lines of EventJson
    GET  /v1/workers/{worker}/logs?lines=N&follow=0|1 -> text/plain (followed: chunked)
    GET  /v1/openapi.json                    -> the OpenAPI description of these routes
"""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict

API_VERSION = "v1"

# Stable error codes (the ``code`` field of ErrorBody).
ERROR_CODES = (
    "bad_request",  # malformed JSON, wrong field types, bad query parameters
    "too_large",  # request body over the limit
    "not_found",  # unknown route
    "unknown_model",
    "unknown_worker",
    "unknown_gpu",
    "invalid_value",  # e.g. replicas out of range
    "config_invalid",  # reload refused: the new config does not validate
    "timeout",  # --wait ran out of time
    "internal",  # a bug: the message says what happened
)


class ErrorDetail(TypedDict):
    """What went wrong, for people (message) and scripts (code)."""

    code: str
    message: str


class ErrorBody(TypedDict):
    """Every non-2xx response."""

    error: ErrorDetail


class GpuProcessJson(TypedDict):
    """A process holding memory on a GPU."""

    pid: int
    used_mib: int | None
    name: str
    ours: bool  # a fleetd worker's process


class GpuJson(TypedDict):
    """One GPU as fleetctl status shows it."""

    index: int
    uuid: str
    name: str
    health: Literal["healthy", "degraded", "lost"]
    health_reason: str
    status: str  # "ok", "cordoned", "drained", "degraded: ...", "lost: ..."
    total_mib: int
    used_mib: int
    ours_mib: int  # held by fleetd's workers
    foreign_mib: int  # held by everything else
    free_mib: int
    temperature_c: int | None
    utilization_pct: int | None
    power_w: float | None
    processes: list[GpuProcessJson]


class WorkerJson(TypedDict):
    """One worker (vLLM replica, Ollama server or Ollama model slot)."""

    name: str
    engine: Literal["vllm", "ollama"]
    kind: Literal["process", "model"]  # an engine process, or a model inside an Ollama server
    models: list[str]
    gpu: int
    gpu_uuid: str
    state: str  # WorkerState value
    reason: str
    since_s: float  # seconds in this state
    uptime_s: float | None  # seconds since it last became ready (None unless ready)
    restarts: int
    port: int | None
    pid: int | None
    vram_mib: int | None  # measured (NVML per-process memory / Ollama size_vram)
    budget_mib: int
    in_flight: int  # requests the gateway has running there now


class PendingJson(TypedDict):
    """A wanted replica that has no GPU, and why."""

    model: str
    replica: int
    reason: str


class OverridesJson(TypedDict):
    """Operator decisions in force (persisted in the state dir)."""

    replicas: dict[str, int]
    cordoned: list[str]  # GPU UUIDs
    fault_cordoned: list[str]  # those fleetd cordoned after a fault (auto failback lifts them)
    drained_gpus: list[str]  # GPU UUIDs
    drained_models: list[str]
    drained_workers: list[str]  # worker names


class GatewayJson(TypedDict):
    """The gateway's address and counters since fleetd started."""

    url: str
    in_flight: int
    requests: int
    retries: int  # tries on a further replica before the first byte
    fallbacks: int  # answered by a fallback model
    refused: int  # answered by the gateway itself: bad request, unknown model, no replica, ...
    upstream_failed: int  # every candidate failed before answering (502)
    mid_stream_failures: int  # an engine died mid-stream: the client got an error event
    client_disconnects: int


class Status(TypedDict):
    """GET /v1/status."""

    version: str
    pid: int
    uptime_s: float
    backend: str
    gpus: list[GpuJson]
    workers: list[WorkerJson]
    pending: list[PendingJson]
    overrides: OverridesJson
    config_path: str
    gateway: GatewayJson | None  # None when [gateway] enabled = false


class Explain(TypedDict):
    """GET /v1/models/{model}/explain."""

    model: str
    engine: str
    budget_mib: int
    priority: int
    replicas_wanted: int
    lines: list[str]  # the story, one sentence per line, for people
    placements: list[dict[str, object]]
    pending: list[PendingJson]


class ScaleRequest(TypedDict):
    """POST /v1/models/{model}/scale."""

    replicas: int


class DrainRequest(TypedDict):
    """POST /v1/drain and /v1/undrain."""

    target: Literal["worker", "gpu", "model"]
    name: str
    timeout_s: NotRequired[float]  # drain only: bound on waiting for in-flight requests


class ActionResult(TypedDict):
    """What a mutating call changed (the daemon acts asynchronously; poll status or events)."""

    ok: bool
    message: str
    event_seq: int  # the event recording the action: follow events from here to see it done


class EventJson(TypedDict):
    """One event (GET /v1/events yields one per line)."""

    seq: int
    ts: float
    kind: str
    message: str
