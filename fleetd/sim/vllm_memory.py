"""How much simulated VRAM an emulated vLLM engine takes, and when vLLM would refuse to start.

Follows vLLM 0.33's arithmetic (reference A.3): the per-instance budget is
``ceil(total * gpu_memory_utilization)`` of the device total; at start the free memory must be
at least that budget or the engine fails with vLLM's exact ``Free memory on device ...`` text;
the KV cache gets the budget minus weights and activation/graph overhead, unless
``--kv-cache-memory-bytes`` sets it exactly (then the utilization only matters for the start
check); if the KV cache cannot hold one sequence of ``max_model_len`` tokens, startup fails.

Model sizes are not known (no weights exist). Unless given (``FLEETD_SIM_WEIGHTS_MIB``,
``FLEETD_SIM_KV_KIB_PER_TOKEN``) they are estimated from the model name (``...-7B...`` = 7e9
bf16 parameters, plus 10 % because names round down and VL models add a vision tower; KV
~48*sqrt(B) KiB per token). A name without a size (``tiny-llama``) is taken for a small test
model: 512 MiB of weights, 1 KiB of KV per token, a 2048-token context, like the tiny Llama of
vllm-on-cpu.md §2. Estimates only shape logs, the KV-cache gauge and sleep mode: the two
size-dependent refusals happen only when the sizes are given, so a guess never fails a start.

Pure functions: no I/O, no clock.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

MIB = 2**20
GIB = 2**30
DEFAULT_MAX_MODEL_LEN = 32768  # a stand-in for the model config's max_position_embeddings
NAME_ROUNDING = 1.1  # "7B" models have ~7.6e9 parameters
UNKNOWN_WEIGHTS_MIB = 512  # a model whose name carries no size: a small test model
UNKNOWN_KV_KIB_PER_TOKEN = 1
UNKNOWN_MAX_MODEL_LEN = 2048
ACTIVATION_MIB = 384  # profiling peak + non-torch memory (CUDA context, NCCL buffers)
CUDA_GRAPH_MIB = 128  # graph capture pool; none with --enforce-eager
WEIGHTS_CAP = 0.8  # an estimated model takes at most this share of the budget after overhead

_SIZE = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)([bBmM])(?![A-Za-z])")


class EngineInitError(Exception):
    """vLLM would fail to start; ``kind`` is the Python exception type vLLM raises."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        self.message = message
        super().__init__(f"{kind}: {message}")


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """Per-GPU (per tensor-parallel rank) memory of one engine, in MiB."""

    requested_mib: int  # the utilization budget checked against free memory at start
    weights_mib: int
    overhead_mib: int
    kv_mib: int
    kv_tokens: int
    max_model_len: int

    @property
    def claim_mib(self) -> int:
        """What the engine holds on each GPU once ready."""
        return self.weights_mib + self.overhead_mib + self.kv_mib


def format_gib(n_bytes: float) -> str:
    """GiB as vLLM's ``format_gib`` writes them: 2 decimals, printed as a Python float."""
    return str(round(n_bytes / GIB, 2))


def model_params_b(model: str) -> float | None:
    """Billions of parameters named in a model id (``Qwen2.5-7B`` -> 7.0, ``opt-125m`` -> 0.125)."""
    match = _SIZE.search(model.rsplit("/", 1)[-1])
    if match is None:
        return None
    return float(match.group(1)) / (1000 if match.group(2) in "mM" else 1)


def weights_mib(model: str, *, tp: int, override_mib: int | None) -> int:
    """bf16 weights per rank: 2 bytes per parameter, split over tensor-parallel ranks."""
    if override_mib is not None:
        return max(1, math.ceil(override_mib / tp))
    params = model_params_b(model)
    if params is None:
        return math.ceil(UNKNOWN_WEIGHTS_MIB / tp)
    return math.ceil(params * 1e9 * 2 * NAME_ROUNDING / MIB / tp)


def kv_kib_per_token(model: str, *, tp: int) -> float:
    """KV bytes per token per rank (about 128 KiB for an 8B GQA model; grows slower than size)."""
    params = model_params_b(model)
    kib = UNKNOWN_KV_KIB_PER_TOKEN if params is None else max(2, round(48 * math.sqrt(params)))
    return kib / tp


def check_free(*, rank: int, total_mib: int, free_mib: int, utilization: float) -> int:
    """The start check of vLLM's ``request_memory``; returns the budget in MiB or raises."""
    requested_bytes = math.ceil(total_mib * MIB * utilization)
    if free_mib * MIB < requested_bytes:
        raise EngineInitError(
            "ValueError",
            f"Free memory on device cuda:{rank} "
            f"({format_gib(free_mib * MIB)}/{format_gib(total_mib * MIB)} GiB) on startup "
            f"is less than desired GPU memory utilization "
            f"({utilization}, {format_gib(requested_bytes)} GiB). Decrease GPU memory "
            "utilization or reduce GPU memory used by other processes.",
        )
    return math.ceil(requested_bytes / MIB)


def overhead_mib(*, enforce_eager: bool) -> int:
    """Activation peak, non-torch memory and (without --enforce-eager) the CUDA-graph pool."""
    return ACTIVATION_MIB + (0 if enforce_eager else CUDA_GRAPH_MIB)


def loaded_weights_mib(
    model: str,
    *,
    total_mib: int,
    utilization: float,
    tp: int = 1,
    enforce_eager: bool = False,
    weights_override_mib: int | None = None,
) -> int:
    """The weights the engine loads; an estimate is capped so it never fails a start alone."""
    weights = weights_mib(model, tp=tp, override_mib=weights_override_mib)
    if weights_override_mib is not None:
        return weights
    room = math.ceil(total_mib * utilization) - overhead_mib(enforce_eager=enforce_eager)
    return max(1, min(weights, math.floor(room * WEIGHTS_CAP)))


def plan(  # noqa: PLR0913 - every argument is one vLLM setting
    *,
    model: str,
    total_mib: int,
    utilization: float,
    kv_cache_memory_bytes: int | None,
    max_model_len: int | None,
    tp: int = 1,
    enforce_eager: bool = False,
    weights_override_mib: int | None = None,
    kv_kib_override: float | None = None,
) -> MemoryPlan:
    """The memory layout after profiling, or the ``ValueError`` vLLM raises instead.

    The two size-dependent refusals (weights leave no room for a KV cache; the KV cache
    cannot hold ``max_model_len`` tokens) need the model's real sizes, so they only happen
    when those are given (``weights_override_mib``, ``kv_kib_override``); estimates from the
    name never refuse a start that real vLLM might accept.
    """
    requested = math.ceil(total_mib * utilization)
    overhead = overhead_mib(enforce_eager=enforce_eager)
    weights = loaded_weights_mib(
        model,
        total_mib=total_mib,
        utilization=utilization,
        tp=tp,
        enforce_eager=enforce_eager,
        weights_override_mib=weights_override_mib,
    )
    if kv_cache_memory_bytes is not None:
        kv = math.ceil(kv_cache_memory_bytes / MIB)
    else:
        kv = requested - weights - overhead
        if kv <= 0:
            raise EngineInitError(
                "ValueError",
                "No available memory for the cache blocks. Try increasing "
                "`gpu_memory_utilization` when initializing the engine.",
            )
    per_token_kib = kv_kib_override or kv_kib_per_token(model, tp=tp)
    kv_tokens = max(1, int(kv * 1024 // per_token_kib))
    default = UNKNOWN_MAX_MODEL_LEN if model_params_b(model) is None else DEFAULT_MAX_MODEL_LEN
    wanted = default if max_model_len is None else max_model_len
    if wanted == -1:  # "auto": the largest that fits
        wanted = min(default, kv_tokens)
    if kv_kib_override is not None and kv_tokens < wanted:
        needed_gib = wanted * per_token_kib / (1024 * 1024)
        raise EngineInitError(
            "ValueError",
            f"To serve at least one request with the model's max seq len ({wanted}), "
            f"({needed_gib:.2f} GiB KV cache is needed, which is larger than the available "
            f"KV cache memory ({kv / 1024:.2f} GiB). Based on the available memory, the "
            f"estimated maximum model length is {kv_tokens}. Try increasing "
            "`gpu_memory_utilization` or decreasing `max_model_len` when initializing "
            "the engine.",
        )
    return MemoryPlan(requested, weights, overhead, kv, kv_tokens, wanted)
