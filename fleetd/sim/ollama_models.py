"""The emulated Ollama's model library ("pulled" models) and its memory arithmetic.

Pure: names, sizes and the VRAM a runner needs for a model, with no I/O. The library is a
built-in catalogue with realistic sizes from ollama.com, which ``FLEETD_SIM_OLLAMA_MODELS`` (a
JSON list of ``{"name": ..., "size_bytes": ..., ...}``) extends or overrides by name.

Memory model (an approximation of llama-server's, documented in ``fleetd.sim.ollama``):
a runner needs the weights (``size_bytes``, the size on disk) plus a KV cache of
``kv_bytes_per_token * num_ctx * num_parallel`` plus a compute graph of 2 % of the weights
(at least 64 MiB). The weights and KV cache split evenly over ``layers``; partial offload
puts whole layers on the GPU, plus the graph.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime

from fleetd.errors import FleetdError

ENV_MODELS = "FLEETD_SIM_OLLAMA_MODELS"
MIB = 1024 * 1024
GIB = 1024 * MIB
GRAPH_MIN_BYTES = 64 * MIB
CUDA_MINIMUM_BYTES = 457 * MIB  # ml.DeviceInfo.MinimumMemory() for CUDA: never handed out
VISION_MIN_CTX = 2048  # sched.getRunner: multimodal models need at least 2048 context
_MODIFIED_AT = datetime(2025, 5, 5, 0, 37, 44, 700000, tzinfo=UTC)


class CatalogueError(FleetdError):
    """FLEETD_SIM_OLLAMA_MODELS is malformed."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One pulled model, with what /api/tags, /api/show and the scheduler need."""

    name: str  # normalised: "name:tag"
    size_bytes: int
    family: str = "llama"
    architecture: str = ""  # GGUF general.architecture; defaults to family
    parameter_size: str = ""
    parameter_count: int = 0
    quantization_level: str = "Q4_K_M"
    digest: str = ""
    layers: int = 32
    capabilities: tuple[str, ...] = ("completion",)
    context_length: int = 131072  # trained context; num_ctx is capped to it
    kv_bytes_per_token: int = 0  # f16 K+V over all layers; 0 = layers * 4 KiB
    embedding_length: int = 4096
    modified_at: datetime = field(default=_MODIFIED_AT)

    def __post_init__(self) -> None:
        # derived defaults, so a JSON entry needs only name and size_bytes
        if not self.architecture:
            object.__setattr__(self, "architecture", self.family)
        if not self.digest:
            digest = hashlib.sha256(f"fleetd-sim-ollama:{self.name}".encode()).hexdigest()
            object.__setattr__(self, "digest", digest)
        if not self.parameter_count:  # Q4_K_M is about 0.6 bytes per parameter
            object.__setattr__(self, "parameter_count", int(self.size_bytes / 0.6))
        if not self.parameter_size:
            object.__setattr__(self, "parameter_size", _human_params(self.parameter_count))
        if not self.kv_bytes_per_token:
            object.__setattr__(self, "kv_bytes_per_token", self.layers * 4096)

    def has(self, capability: str) -> bool:
        """Whether the model lists ``capability`` (completion, vision, embedding, ...)."""
        return capability in self.capabilities


def _human_params(count: int) -> str:
    if count >= 1_000_000_000:
        return f"{count / 1e9:.1f}B"
    return f"{round(count / 1e6)}M"


# Sizes are ollama.com's download sizes; layer counts and KV geometry from the models' configs.
# fmt: off
BUILTIN: tuple[ModelSpec, ...] = (
    ModelSpec("deepcoder:14b", 8_988_111_436, family="qwen2", parameter_size="14.8B",
       parameter_count=14_770_033_664, layers=48, kv_bytes_per_token=196_608,
       embedding_length=5120),
    ModelSpec("qwen2.5vl:3b", 3_203_245_780, family="qwen25vl", parameter_size="3.8B",
       parameter_count=3_754_622_976, layers=36, capabilities=("completion", "vision"),
       context_length=128_000, kv_bytes_per_token=36_864, embedding_length=2048),
    ModelSpec("qwen2.5vl:7b", 5_969_245_856, family="qwen25vl", parameter_size="8.3B",
       parameter_count=8_292_166_656, layers=28, capabilities=("completion", "vision"),
       context_length=128_000, kv_bytes_per_token=57_344, embedding_length=3584),
    ModelSpec("deepseek-r1:32b", 19_851_337_640, family="qwen2", parameter_size="32.8B",
       parameter_count=32_763_876_352, layers=64, capabilities=("completion", "thinking"),
       kv_bytes_per_token=262_144, embedding_length=5120),
    ModelSpec("mixtral:8x22b", 79_509_470_182, family="llama", parameter_size="140.6B",
       parameter_count=140_620_634_112, quantization_level="Q4_0", layers=56,
       capabilities=("completion", "tools"), context_length=65_536,
       kv_bytes_per_token=229_376, embedding_length=6144),
    ModelSpec("llama3.2:3b", 2_019_393_189, family="llama", parameter_size="3.2B",
       parameter_count=3_212_749_888, layers=28, capabilities=("completion", "tools"),
       kv_bytes_per_token=114_688, embedding_length=3072,
       digest="a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72"),
    ModelSpec("llama3.2:latest", 2_019_393_189, family="llama", parameter_size="3.2B",
       parameter_count=3_212_749_888, layers=28, capabilities=("completion", "tools"),
       kv_bytes_per_token=114_688, embedding_length=3072,
       digest="a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72"),
    ModelSpec("nomic-embed-text:latest", 274_302_450, family="nomic-bert", parameter_size="137M",
       parameter_count=136_727_040, quantization_level="F16", layers=12,
       capabilities=("embedding",), context_length=2048, kv_bytes_per_token=36_864,
       embedding_length=768),
)
# fmt: on


def normalise(name: str) -> str:
    """Canonical name: registry host and ``library/`` dropped, ``:latest`` added, lower case."""
    text = name.strip().lower()
    for prefix in ("registry.ollama.ai/", "library/"):
        text = text.removeprefix(prefix)
    if ":" not in text.rsplit("/", 1)[-1]:
        text += ":latest"
    return text


class Catalogue:
    """The pulled models, by normalised name."""

    def __init__(self, models: list[ModelSpec]) -> None:
        self._models = {normalise(m.name): replace(m, name=normalise(m.name)) for m in models}

    def lookup(self, name: str) -> ModelSpec | None:
        """The model a request names, or None when it is not pulled."""
        return self._models.get(normalise(name)) if name.strip() else None

    def models(self) -> list[ModelSpec]:
        """Every pulled model, by name."""
        return [self._models[k] for k in sorted(self._models)]

    @classmethod
    def from_env(cls, environ: dict[str, str]) -> Catalogue:
        """The built-in catalogue, extended and overridden by FLEETD_SIM_OLLAMA_MODELS."""
        extra = environ.get(ENV_MODELS, "").strip()
        models = {normalise(m.name): m for m in BUILTIN}
        if extra:
            for spec in _parse_models(extra):
                models[normalise(spec.name)] = spec
        return cls(list(models.values()))


def _parse_models(text: str) -> list[ModelSpec]:
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise CatalogueError(f"{ENV_MODELS} is not JSON: {exc}") from None
    if not isinstance(doc, list):
        raise CatalogueError(f"{ENV_MODELS} must be a JSON list of objects")
    known = {f.name for f in fields(ModelSpec)} - {"modified_at"}
    out = []
    for item in doc:
        if not isinstance(item, dict) or not {"name", "size_bytes"} <= item.keys():
            raise CatalogueError(f"{ENV_MODELS}: each entry needs name and size_bytes: {item!r}")
        unknown = item.keys() - known
        if unknown:
            raise CatalogueError(f"{ENV_MODELS}: unknown keys {sorted(unknown)} in {item!r}")
        values = dict(item)
        if "capabilities" in values:
            values["capabilities"] = tuple(values["capabilities"])
        try:
            out.append(ModelSpec(**values))
        except TypeError as exc:
            raise CatalogueError(f"{ENV_MODELS}: {exc}") from None
    return out


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """What a runner will hold: total memory, the part in VRAM, GPU layers, context."""

    total_bytes: int
    vram_bytes: int
    gpu_layers: int
    num_ctx: int
    num_parallel: int

    @property
    def vram_mib(self) -> int:
        """The VRAM claim, in whole MiB (what the driver would show)."""
        return math.ceil(self.vram_bytes / MIB)


def default_context(total_vram_bytes: int) -> int:
    """OLLAMA_CONTEXT_LENGTH=0: 262144 from 47 GiB of VRAM, 32768 from 23 GiB, else 4096."""
    if total_vram_bytes >= 47 * GIB:
        return 262144
    if total_vram_bytes >= 23 * GIB:
        return 32768
    return 4096


def effective_context(spec: ModelSpec, requested: int) -> int:
    """num_ctx as the runner gets it: at least 2048 for vision, at most the trained context."""
    ctx = max(requested, VISION_MIN_CTX) if spec.has("vision") else max(requested, 4)
    return min(ctx, spec.context_length) if spec.context_length > 0 else ctx


def plan_memory(
    spec: ModelSpec,
    *,
    num_ctx: int,
    num_parallel: int,
    num_gpu: int | None,
    available_bytes: int | None,
) -> MemoryPlan:
    """Full load when it fits in ``available_bytes``, else whole layers; None/0 = CPU only."""
    kv = spec.kv_bytes_per_token * num_ctx * num_parallel
    graph = max(GRAPH_MIN_BYTES, spec.size_bytes // 50)
    total = spec.size_bytes + kv + graph
    if available_bytes is None or num_gpu == 0:
        return MemoryPlan(total, 0, 0, num_ctx, num_parallel)
    limit = spec.layers if num_gpu is None or num_gpu < 0 else min(num_gpu, spec.layers)
    if limit == spec.layers and total <= available_bytes:
        return MemoryPlan(total, total, spec.layers, num_ctx, num_parallel)
    per_layer = math.ceil((spec.size_bytes + kv) / spec.layers)
    fit = (available_bytes - graph) // per_layer if available_bytes > graph else 0
    layers = max(0, min(limit, fit, spec.layers - 1))
    vram = layers * per_layer + graph if layers else 0
    return MemoryPlan(total, vram, layers, num_ctx, num_parallel)
