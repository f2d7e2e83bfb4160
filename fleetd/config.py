"""fleetd.toml as frozen, validated data.

Every key a user can write is declared here with its unit, default and the reason for the
default. Models are frozen and forbid unknown keys, so a typo is an error, not a silent no-op.
``load_config`` is the only function that does I/O; ``parse_config`` validates a parsed
document and reports *every* mistake at once (see ``fleetd.config_errors``).
"""

from __future__ import annotations

import enum
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fleetd import config_errors
from fleetd.errors import ConfigError
from fleetd.model import units

# Engine flags that fleetd sets itself; letting engine_args set them too would make the
# worker disagree with the supervisor about its port, GPU share or name.
VLLM_RESERVED_FLAGS = (
    "--host",
    "--port",
    "--uds",
    "--gpu-memory-utilization",
    "--device-memory-utilization",
    "--served-model-name",
    "--model",
    "--shutdown-timeout",
    "--max-model-len",
)

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._:-]{0,62}$")


class _Frozen(BaseModel):
    # allow_inf_nan=False: TOML has `inf` and `nan`; no size or duration here means either.
    model_config = ConfigDict(
        frozen=True, extra="forbid", validate_default=True, allow_inf_nan=False
    )


class Engine(enum.StrEnum):
    """Inference engines fleetd can supervise."""

    VLLM = "vllm"
    OLLAMA = "ollama"


class Capability(enum.StrEnum):
    """What a model is good at; the gateway routes ``model="auto"`` requests by these."""

    CHAT = "chat"
    VISION = "vision"
    CODE = "code"
    REASONING = "reasoning"
    EMBEDDINGS = "embeddings"


GpuRef = Annotated[
    int | str,
    Field(
        description="A GPU by NVML index (0, 1, ...) or by UUID ('GPU-b850f46d-...'). "
        "UUIDs survive re-enumeration; indices are easier to read."
    ),
]


def _check_gpu_ref(ref: int | str) -> None:
    if isinstance(ref, int) and ref < 0:
        raise ValueError(f"GPU index {ref} is negative")
    if isinstance(ref, str) and not ref.startswith(("GPU-", "MIG-")):
        raise ValueError(f"{ref!r} is neither a GPU index nor an NVML UUID ('GPU-...')")


class HealthSpec(_Frozen):
    """How a worker's health is judged and how failures are retried."""

    start_timeout_s: float = Field(
        600.0,
        gt=0,
        description="Seconds from launch until the engine must answer its health check. "
        "Default 600: a cold vLLM load of a 7B model with CUDA graphs takes minutes.",
    )
    probe_interval_s: float = Field(5.0, gt=0, description="Seconds between health probes.")
    probe_timeout_s: float = Field(2.0, gt=0, description="Seconds one health probe may take.")
    unhealthy_after: int = Field(
        3, ge=1, description="Consecutive failed probes after which a ready worker is hung."
    )
    stop_grace_s: float = Field(
        30.0,
        ge=0,
        description="Seconds between SIGTERM and SIGKILL to the worker's process group. "
        "vLLM gets --shutdown-timeout of this minus 10 s to finish in-flight requests.",
    )
    drain_timeout_s: float = Field(
        60.0,
        ge=0,
        description="Before a planned stop, seconds to wait for in-flight requests to finish "
        "(the engine reports none running) before SIGTERM.",
    )
    backoff_initial_s: float = Field(2.0, gt=0, description="First restart delay after a crash.")
    backoff_max_s: float = Field(120.0, gt=0, description="Cap on the restart delay.")
    max_restarts: int = Field(
        5, ge=1, description="Crashes within restart_window_s after which the worker is failed."
    )
    restart_window_s: float = Field(600.0, gt=0, description="Window for max_restarts.")

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        if self.probe_timeout_s > self.probe_interval_s:
            raise ValueError(
                f"probe_timeout_s ({self.probe_timeout_s}) must not exceed "
                f"probe_interval_s ({self.probe_interval_s})"
            )
        if self.backoff_initial_s > self.backoff_max_s:
            raise ValueError(
                f"backoff_initial_s ({self.backoff_initial_s}) must not exceed "
                f"backoff_max_s ({self.backoff_max_s})"
            )
        return self


class ModelSpec(_Frozen):
    """One model deployment: what to serve, with which engine, inside which VRAM budget."""

    name: str = Field(
        description="fleetd's name for the deployment (lower case, digits, . _ : -); "
        "used by fleetctl and as the default served name."
    )
    engine: Engine
    model: str = Field(
        min_length=1,
        description="What the engine loads: a Hugging Face id or local path for vLLM, "
        "an Ollama tag such as 'deepcoder:14b' for Ollama.",
    )
    served_name: str | None = Field(
        None, description="Name clients use in requests; defaults to `name`."
    )
    aliases: tuple[str, ...] = Field((), description="Further names the gateway accepts.")
    vram_gib: float = Field(
        gt=0,
        le=1024,
        description="GiB of GPU memory the model itself needs (weights + KV cache + activations).",
    )
    overhead_gib: float = Field(
        2.0,
        ge=0,
        le=64,
        description="GiB on top of vram_gib for CUDA context, graphs and fragmentation; "
        "2-4 is typical for vLLM. The budget is vram_gib + overhead_gib.",
    )
    size_gib: float | None = Field(
        None,
        gt=0,
        description="Ollama only: full size of the model. When larger than the budget, "
        "Ollama offloads the rest to system RAM (partial offload, slower).",
    )
    min_vram_gib: float | None = Field(
        None,
        gt=0,
        description="Ollama only: when vram_gib cannot be had (e.g. evicted by a failover), "
        "run with as little as this in VRAM, the rest of the layers in system RAM (slower), "
        "rather than not at all. Unset: vram_gib or nothing.",
    )
    replicas: int = Field(1, ge=0, le=64, description="Workers wanted, each on its own GPU.")
    priority: int = Field(
        0,
        ge=0,
        le=1000,
        description="Higher wins: a model may evict lower-priority models to get a GPU.",
    )
    allowed_gpus: tuple[GpuRef, ...] = Field(
        (), description="GPUs the model may run on; empty means any."
    )
    preferred_gpus: tuple[GpuRef, ...] = Field(
        (), description="GPUs tried first, in order, when placing a new replica."
    )
    max_model_len: int | None = Field(
        None, gt=0, description="vLLM only: --max-model-len (context length in tokens)."
    )
    engine_args: tuple[str, ...] = Field(
        (), description="Extra command-line arguments passed to the engine unchanged."
    )
    capabilities: tuple[Capability, ...] = Field(
        (Capability.CHAT,), description="What the model is for; used by gateway routing."
    )
    fallbacks: tuple[str, ...] = Field(
        (),
        description="Models (by name) the gateway uses, in order, when no replica is ready.",
    )
    standby: bool = Field(
        default=False,
        description="vLLM only: keep a warm standby of this model asleep (vLLM sleep mode, "
        "weights in host RAM) on a GPU without one of its replicas; a failover wakes it "
        "(seconds) instead of loading the model cold. Its engines run with "
        "--enable-sleep-mode and VLLM_SERVER_DEV_MODE=1 (the sleep endpoints).",
    )
    standby_vram_gib: float = Field(
        1.0,
        gt=0,
        le=64,
        description="GPU memory the standby keeps while asleep (CUDA context, buffers); it "
        "needs its full budget again to wake, and to load before it first sleeps.",
    )
    health: HealthSpec = Field(default_factory=HealthSpec)

    @field_validator("name", "served_name")
    @classmethod
    def _valid_name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME_RE.match(value):
            raise ValueError(
                "must be 1-63 characters of lower-case letters, digits and . _ : - "
                "starting with a letter or digit"
            )
        return value

    @field_validator("allowed_gpus", "preferred_gpus")
    @classmethod
    def _valid_gpu_refs(cls, value: tuple[int | str, ...]) -> tuple[int | str, ...]:
        for ref in value:
            _check_gpu_ref(ref)
        if len(set(value)) != len(value):
            raise ValueError("lists a GPU twice")
        return value

    # Engine-specific keys are checked per key (not per model) so each problem names its key
    # and is reported even when other keys of the model are wrong too. ``engine`` is declared
    # before them, so ``info.data`` has it when it was valid.
    @field_validator("engine_args")
    @classmethod
    def _engine_args(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        engine = info.data.get("engine")
        if engine is Engine.OLLAMA and value:
            raise ValueError("applies to vLLM models only; Ollama takes models by tag")
        taken = [a.split("=", 1)[0] for a in value if a.split("=", 1)[0] in VLLM_RESERVED_FLAGS]
        if engine is Engine.VLLM and taken:
            raise ValueError(
                f"sets {', '.join(taken)}, which fleetd sets itself; remove it "
                "(use max_model_len / vram_gib instead where relevant)"
            )
        return value

    @field_validator("size_gib")
    @classmethod
    def _size_for_ollama(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and info.data.get("engine") is Engine.VLLM:
            raise ValueError("partial offload applies to Ollama models only")
        return value

    @field_validator("min_vram_gib")
    @classmethod
    def _shrink_for_ollama(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is None:
            return value
        if info.data.get("engine") is Engine.VLLM:
            raise ValueError("applies to Ollama models only (vLLM cannot offload layers)")
        vram = info.data.get("vram_gib")
        if isinstance(vram, float | int) and value > vram:
            raise ValueError(f"is more than vram_gib ({vram:g})")
        return value

    @field_validator("max_model_len")
    @classmethod
    def _len_for_vllm(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("engine") is Engine.OLLAMA:
            raise ValueError("applies to vLLM models only")
        return value

    @field_validator("standby")
    @classmethod
    def _standby_for_vllm(cls, value: bool, info: ValidationInfo) -> bool:  # noqa: FBT001
        if value and info.data.get("engine") is Engine.OLLAMA:
            raise ValueError("applies to vLLM models only (Ollama has no sleep mode)")
        return value

    @field_validator("fallbacks")
    @classmethod
    def _not_itself(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if info.data.get("name") in value:
            raise ValueError("lists the model itself")
        return value

    @property
    def served(self) -> str:
        """The name clients send in requests."""
        return self.served_name or self.name

    @property
    def budget_mib(self) -> int:
        """VRAM the planner reserves for one replica: vram + overhead, in MiB."""
        return units.gib_to_mib(self.vram_gib + self.overhead_gib)

    @property
    def min_budget_mib(self) -> int | None:
        """The smallest budget a shrunk (partially offloaded) replica may run with."""
        if self.min_vram_gib is None:
            return None
        return units.gib_to_mib(self.min_vram_gib + self.overhead_gib)

    @property
    def standby_mib(self) -> int:
        """VRAM an asleep standby of this model keeps."""
        return units.gib_to_mib(self.standby_vram_gib)

    @property
    def offloaded_mib(self) -> int:
        """MiB that partial offload keeps in system RAM (0 when the model fits its budget)."""
        if self.size_gib is None:
            return 0
        return max(0, units.gib_to_mib(self.size_gib) - units.gib_to_mib(self.vram_gib))


class GpuOverride(_Frozen):
    """Per-GPU settings, matched by index or UUID."""

    gpu: GpuRef
    reserved_mib: int = Field(
        0,
        ge=0,
        description="MiB fleetd never plans on this GPU (e.g. for a display or a desktop session).",
    )

    @field_validator("gpu")
    @classmethod
    def _valid_gpu_ref(cls, value: int | str) -> int | str:
        _check_gpu_ref(value)
        return value


class GpusSpec(_Frozen):
    """What fleetd expects of the host's GPUs."""

    expected_count: int | None = Field(
        None,
        ge=0,
        le=64,
        description="GPUs the host should have; fewer found is reported as a fault. "
        "Unset: whatever NVML finds.",
    )
    device: tuple[GpuOverride, ...] = Field((), description="Per-GPU overrides.")
    health_debounce_s: float = Field(
        2.0,
        ge=0,
        le=600,
        description="A GPU's health changes for placement only after it has been reported "
        "this long (one NVML timeout does not move a model).",
    )
    failback: Literal["manual", "auto"] = Field(
        "auto",
        description="After a fault fleetd cordons the GPU. manual: it stays cordoned until "
        "`fleetctl uncordon`. auto: uncordoned once healthy for failback_after_s.",
    )
    failback_after_s: float = Field(
        300.0, ge=0, le=86400, description="auto failback: how long the GPU must stay healthy."
    )
    max_moves: int = Field(
        3,
        ge=1,
        le=100,
        description="A GPU evacuated this many times within moves_window_s is flapping: no "
        "auto failback until an operator uncordons it.",
    )
    moves_window_s: float = Field(3600.0, gt=0, le=7 * 86400)
    xid_restart_holdoff_s: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="After an application-level XID restarts a GPU's workers, further such "
        "XIDs on that GPU within this time restart nothing more.",
    )


class PortRange(_Frozen):
    """A range of loopback TCP ports fleetd allocates worker ports from."""

    first: int = Field(ge=1024, le=65535)
    last: int = Field(ge=1024, le=65535)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.first > self.last:
            raise ValueError(f"first ({self.first}) is greater than last ({self.last})")
        return self


class EngineCommand(_Frozen):
    """How to run one engine binary, from its own environment (fleetd never imports it)."""

    command: tuple[str, ...] = Field(
        min_length=1, description="argv prefix, e.g. ['/opt/vllm/bin/vllm'] or ['ollama']."
    )
    ports: PortRange
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment for every worker of this engine."
    )
    shutdown_timeout: bool = Field(
        default=True,
        description="vLLM only: pass --shutdown-timeout so SIGTERM drains in-flight requests "
        "(vLLM >= 0.32). Set false for older vLLM, which rejects the flag.",
    )


class EnginesSpec(_Frozen):
    """Commands for each engine."""

    vllm: EngineCommand = Field(
        default_factory=lambda: EngineCommand(
            command=("vllm",), ports=PortRange(first=18100, last=18199)
        )
    )
    ollama: EngineCommand = Field(
        default_factory=lambda: EngineCommand(
            command=("ollama",), ports=PortRange(first=18200, last=18263)
        )
    )


class DaemonSpec(_Frozen):
    """Where fleetd keeps its state and logs."""

    state_dir: Path = Field(
        Path("/var/lib/fleetd"),
        description="Worker records and operator overrides (systemd StateDirectory).",
    )
    log_dir: Path = Field(
        Path("/var/log/fleetd"),
        description="Per-worker engine logs (systemd LogsDirectory).",
    )
    log_format: Literal["auto", "console", "json"] = Field(
        "auto", description="auto: human-readable on a terminal, JSON lines otherwise."
    )
    on_exit: Literal["stop", "leave"] = Field(
        "stop",
        description="On SIGTERM: stop the workers, or leave them running for the next fleetd "
        "to adopt (used for upgrades without reloading models).",
    )
    resync_interval_s: float = Field(
        30.0, gt=0, description="Periodic full reconcile, on top of event-driven ones."
    )


class ControlSpec(_Frozen):
    """The local control socket used by fleetctl."""

    socket_path: Path = Field(Path("/run/fleetd/control.sock"))
    socket_mode: str = Field("0660", description="Octal file mode of the socket.")
    socket_group: str | None = Field(
        None, description="Group owning the socket; operators in it may use fleetctl."
    )

    @field_validator("socket_mode")
    @classmethod
    def _octal(cls, value: str) -> str:
        if not re.fullmatch(r"0?[0-7]{3}", value):
            raise ValueError("must be an octal mode such as '0660'")
        return value


class RouteRule(_Frozen):
    """One `model="auto"` rule: a task header value or a prompt pattern -> a capability."""

    capability: Capability = Field(description="What the request needs when the rule matches.")
    task: str | None = Field(
        None,
        min_length=1,
        description="Matches when the request's task header (gateway.task_header) equals this "
        "value, case-insensitively.",
    )
    prompt: str | None = Field(
        None,
        min_length=1,
        description="A Python regular expression searched in the request's last user message.",
    )

    @field_validator("prompt")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _something(self) -> Self:
        if self.task is None and self.prompt is None:
            raise ValueError("a rule needs `task`, `prompt` or both")
        return self


DEFAULT_ROUTE_RULES: tuple[RouteRule, ...] = (
    RouteRule(capability=Capability.CODE, task="code"),
    RouteRule(capability=Capability.REASONING, task="reasoning"),
    RouteRule(capability=Capability.VISION, task="vision"),
    RouteRule(
        capability=Capability.CODE,
        prompt=r"\x60{3}|(?i:\b(?:code|function|python|rust|golang|javascript|typescript|sql|regex"
        r"|compile[rs]?|stack ?trace|refactor|debug|bug)\b)",
    ),
    RouteRule(
        capability=Capability.REASONING,
        prompt=r"(?i:\b(?:prove|proof|step by step|reason(?:ing)? through|derive|theorem"
        r"|puzzle|riddle)\b)",
    ),
)


class GatewaySpec(_Frozen):
    """The OpenAI-compatible endpoint in front of the fleet (also Ollama's native API)."""

    enabled: bool = True
    host: str = Field("127.0.0.1", description="Address to bind; loopback unless you mean it.")
    port: int = Field(8000, ge=0, le=65535, description="0 picks a free port (tests, demos).")
    default_model: str | None = Field(
        None,
        description='Model used for `model="auto"` requests no rule matches (default: the '
        "highest-priority chat model).",
    )
    auto_model: str = Field(
        "auto", min_length=1, description="The model name that asks the gateway to choose."
    )
    task_header: str = Field(
        "X-Fleetd-Task", min_length=1, description="Request header the `task` rules look at."
    )
    rules: tuple[RouteRule, ...] = Field(
        DEFAULT_ROUTE_RULES,
        description='`model="auto"` rules, first match wins (image parts always pick '
        "a vision model first). Default: task header code/reasoning/vision, then prompt "
        "patterns for code and for reasoning.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="File with one accepted API key per line (`Authorization: Bearer KEY`); "
        "unset: no key needed. Read at start and on reload.",
    )
    max_request_mib: float = Field(
        32.0, gt=0, le=1024, description="Largest request body accepted (images included)."
    )
    request_timeout_s: float = Field(
        600.0, gt=0, le=86400, description="Whole-request bound, streams included."
    )
    connect_timeout_s: float = Field(
        2.0, gt=0, le=60, description="Connecting to an engine; past it the next replica is tried."
    )
    drain_timeout_s: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="On shutdown: how long in-flight requests may run before engines stop.",
    )


class AlertHook(_Frozen):
    """One alert destination."""

    kind: Literal["exec", "webhook"]
    target: str = Field(
        min_length=1,
        description="exec: the command (absolute path; the event JSON arrives on stdin, key "
        "facts in FLEETD_* environment variables). webhook: the URL to POST to.",
    )
    events: tuple[str, ...] = Field(
        ("*",),
        description="Event kinds (or prefixes ending in '.') that fire this hook, e.g. "
        "'gpu.lost', 'worker.'; '*' for every problem event.",
    )
    format: Literal["json", "alertmanager"] = Field(
        "json",
        description="webhook only: the event as JSON, or an Alertmanager-compatible list of "
        "alerts (POST to Alertmanager's /api/v2/alerts).",
    )
    timeout_s: float = Field(5.0, gt=0, le=300, description="Per delivery attempt.")
    retries: int = Field(3, ge=0, le=20, description="Further attempts after a failure.")
    backoff_initial_s: float = Field(
        1.0, gt=0, le=600, description="Delay before the first retry; doubles each time."
    )

    @model_validator(mode="after")
    def _format_for_webhooks(self) -> Self:
        if self.kind == "exec" and self.format != "json":
            raise ValueError("format applies to webhooks only")
        if self.kind == "webhook" and not self.target.startswith(("http://", "https://")):
            raise ValueError(f"webhook target must be an http(s) URL, not {self.target!r}")
        if self.kind == "exec" and not self.target.startswith("/"):
            raise ValueError(f"exec target must be an absolute path, not {self.target!r}")
        return self


class AlertsSpec(_Frozen):
    """Alert hooks fired on events."""

    hooks: tuple[AlertHook, ...] = ()
    dedup_window_s: float = Field(
        300.0,
        ge=0,
        description="The same event kind for the same subject fires once per window.",
    )
    max_per_minute: int = Field(
        30, ge=1, le=10_000, description="Rate limit per hook; the excess is dropped and counted."
    )


class MetricsSpec(_Frozen):
    """The Prometheus endpoint."""

    enabled: bool = True
    host: str = Field("127.0.0.1", description="Address to serve /metrics on.")
    port: int = Field(
        9400, ge=0, le=65535, description="Port to serve /metrics on; 0 picks a free one."
    )
    availability_target: float = Field(
        0.999, gt=0, le=1, description="Per-model availability objective (ready replica time)."
    )


class SimGpu(_Frozen):
    """One GPU of the simulated host."""

    name: str = "Simulated GPU"
    total_mib: int = Field(gt=0, le=1024 * 1024)
    reserved_mib: int = Field(0, ge=0)


class SimulationSpec(_Frozen):
    """The simulated host used by `fleetd demo` and `fleetd plan --simulate`."""

    gpus: tuple[SimGpu, ...] = Field(
        (
            SimGpu(name="NVIDIA GeForce RTX 4070 Ti SUPER", total_mib=16384),
            SimGpu(name="NVIDIA GeForce RTX 4070 Ti SUPER", total_mib=16384),
        ),
        min_length=1,
    )


class FleetConfig(_Frozen):
    """The whole of fleetd.toml."""

    daemon: DaemonSpec = Field(default_factory=DaemonSpec)
    control: ControlSpec = Field(default_factory=ControlSpec)
    gateway: GatewaySpec = Field(default_factory=GatewaySpec)
    engines: EnginesSpec = Field(default_factory=EnginesSpec)
    gpus: GpusSpec = Field(default_factory=GpusSpec)
    alerts: AlertsSpec = Field(default_factory=AlertsSpec)
    metrics: MetricsSpec = Field(default_factory=MetricsSpec)
    simulation: SimulationSpec = Field(default_factory=SimulationSpec)
    models: tuple[ModelSpec, ...] = ()

    def model_named(self, name: str) -> ModelSpec | None:
        """The model deployment called ``name``, or None."""
        return next((m for m in self.models if m.name == name), None)


# Keys the schema accepts that this version does not act on yet. `fleetd check-config`
# prints them, so no key does nothing without saying so.
NOT_YET_ACTIVE: dict[str, str] = {}


Problems = list[config_errors.Problem]


def cross_check(cfg: FleetConfig) -> Problems:
    """Checks that span several keys; each problem names the key path it is about."""
    return [
        *_check_names(cfg),
        *_check_model_refs(cfg),
        *_check_ports(cfg),
        *_check_gpu_overrides(cfg),
    ]


def _index_range(count: int) -> str:
    return f"gpus.expected_count is {count}, so GPU indices run 0-{count - 1}"


def _check_names(cfg: FleetConfig) -> Problems:
    """Every name a client may send (name, served_name, aliases) picks exactly one model."""
    problems: Problems = []
    owners: dict[str, int] = {}
    for i, model in enumerate(cfg.models):
        where = f"models[{i}]({model.name})"
        claims = [(f"{where}.name", model.name)]
        if model.served_name is not None and model.served_name != model.name:
            claims.append((f"{where}.served_name", model.served_name))
        claims.extend((f"{where}.aliases[{j}]", alias) for j, alias in enumerate(model.aliases))
        for path, key in claims:
            if key == cfg.gateway.auto_model:
                problems.append(
                    config_errors.Problem(
                        path, key, "is gateway.auto_model, the name that asks the gateway to choose"
                    )
                )
            owner = owners.setdefault(key, i)
            if owner != i:
                problems.append(
                    config_errors.Problem(
                        path, key, f"already used by models[{owner}]({cfg.models[owner].name})"
                    )
                )
    return problems


def _check_model_refs(cfg: FleetConfig) -> Problems:
    """Fallbacks name real models; GPU references fit the expected GPU count."""
    problems: Problems = []
    by_name = {m.name: m for m in cfg.models}
    known = ", ".join(sorted(by_name)) or "(none)"
    count = cfg.gpus.expected_count
    for i, model in enumerate(cfg.models):
        where = f"models[{i}]({model.name})"
        problems.extend(
            config_errors.Problem(
                f"{where}.fallbacks[{j}]", fb, f"no model is named {fb!r}; known: {known}"
            )
            for j, fb in enumerate(model.fallbacks)
            if fb not in by_name
        )
        for key in ("allowed_gpus", "preferred_gpus"):
            problems.extend(
                config_errors.Problem(f"{where}.{key}[{j}]", ref, _index_range(count))
                for j, ref in enumerate(getattr(model, key))
                if count is not None and isinstance(ref, int) and ref >= count
            )
        if model.allowed_gpus:
            problems.extend(
                config_errors.Problem(f"{where}.preferred_gpus[{j}]", ref, "is not in allowed_gpus")
                for j, ref in enumerate(model.preferred_gpus)
                if ref not in model.allowed_gpus
            )
    default = cfg.gateway.default_model
    if default is not None and default not in by_name:
        problems.append(
            config_errors.Problem(
                "gateway.default_model", default, f"no model is named so; known: {known}"
            )
        )
    return problems


def _check_ports(cfg: FleetConfig) -> Problems:
    """Engine port ranges do not overlap each other or the gateway's port."""
    problems: Problems = []
    first = cfg.engines.vllm.ports
    second = cfg.engines.ollama.ports
    if first.first <= second.last and second.first <= first.last:
        problems.append(
            config_errors.Problem(
                "engines.ollama.ports",
                f"{second.first}-{second.last}",
                f"overlaps engines.vllm.ports {first.first}-{first.last}",
            )
        )
    problems.extend(
        config_errors.Problem(
            "gateway.port",
            cfg.gateway.port,
            f"lies inside engines.{name}.ports {rng.first}-{rng.last}",
        )
        for name, rng in (("vllm", first), ("ollama", second))
        if rng.first <= cfg.gateway.port <= rng.last
    )
    return problems


def _check_gpu_overrides(cfg: FleetConfig) -> Problems:
    """[[gpus.device]] entries name each GPU once and within the expected count."""
    problems: Problems = []
    seen: set[int | str] = set()
    count = cfg.gpus.expected_count
    for i, dev in enumerate(cfg.gpus.device):
        if dev.gpu in seen:
            problems.append(config_errors.Problem(f"gpus.device[{i}].gpu", dev.gpu, "listed twice"))
        seen.add(dev.gpu)
        if count is not None and isinstance(dev.gpu, int) and dev.gpu >= count:
            problems.append(
                config_errors.Problem(f"gpus.device[{i}].gpu", dev.gpu, _index_range(count))
            )
    return problems


def parse_config(doc: dict[str, Any], *, source: str = "<config>") -> FleetConfig:
    """Validate a parsed TOML document; raise ConfigError listing every problem found."""
    try:
        cfg = FleetConfig.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(source, config_errors.from_pydantic(exc, doc)) from None
    problems = cross_check(cfg)
    if problems:
        raise ConfigError(source, problems)
    return cfg


def load_config(path: Path) -> FleetConfig:
    """Read and validate fleetd.toml; the only I/O in this module."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            str(path), [config_errors.Problem("", str(path), "file not found")]
        ) from None
    except OSError as exc:
        raise ConfigError(
            str(path), [config_errors.Problem("", str(path), f"cannot read: {exc.strerror}")]
        ) from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            str(path),
            [config_errors.Problem("", f"byte {exc.start}", "file is not valid UTF-8")],
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            str(path), [config_errors.Problem("", "", f"not valid TOML: {exc}")]
        ) from None
    return parse_config(doc, source=str(path))
