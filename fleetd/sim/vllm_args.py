"""The vLLM emulator's command line: ``serve MODEL [options]``, parsed like vLLM 0.33 parses it.

fleetd builds real vLLM command lines; the emulator must accept exactly what vLLM accepts and
reject what vLLM rejects, or tests would pass against a friendlier engine than the real one.
So: unknown flags fail with argparse's ``unrecognized arguments`` and exit code 2 (this is how
vLLM 0.33 rejects the removed ``--disable-log-requests``), flags fleetd sets are parsed with
vLLM's value syntax (``--max-model-len 25.6k``, ``--kv-cache-memory-bytes 64M``,
``--limit-mm-per-prompt '{"image": 2}'`` or ``--limit-mm-per-prompt.image 2``), and common
flags the emulator has no use for are accepted and ignored.

Pure parsing: no I/O beyond argparse's own usage errors (which exit 2).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

VERSION = "0.33.0"
DEFAULT_MODEL = "Qwen/Qwen3-0.6B"  # vLLM's ModelConfig.model default
MM_DEFAULT_LIMIT = 999  # "defaults to 999 for each modality" (vLLM 0.33 docs)

# Flags that take one value and change nothing in the emulator (accepted, as vLLM accepts them).
_IGNORED_VALUE_FLAGS: tuple[tuple[str, ...], ...] = (
    ("--pipeline-parallel-size", "-pp"),
    ("--data-parallel-size", "-dp"),
    ("--max-num-batched-tokens",),
    ("--dtype",),
    ("--quantization", "-q"),
    ("--kv-cache-dtype",),
    ("--seed",),
    ("--tokenizer",),
    ("--tokenizer-mode",),
    ("--revision",),
    ("--download-dir",),
    ("--load-format",),
    ("--generation-config",),
    ("--chat-template",),
    ("--tool-call-parser",),
    ("--reasoning-parser",),
    ("--block-size",),
    ("--swap-space",),
    ("--cpu-offload-gb",),
    ("--max-logprobs",),
    ("--device",),
    ("--distributed-executor-backend",),
    ("--hf-overrides",),
    ("--override-generation-config",),
    ("--mm-processor-kwargs",),
    ("--compilation-config",),
    ("--speculative-config",),
    ("--root-path",),
    ("--allowed-origins",),
    ("--show-hidden-metrics-for-version",),
    ("--disable-access-log-for-endpoints",),
    ("--max-seq-len-to-capture",),
    ("--worker-cls",),
)
_IGNORED_BOOL_FLAGS: tuple[str, ...] = (
    "--trust-remote-code",
    "--enable-prefix-caching",
    "--enable-chunked-prefill",
    "--enable-log-requests",
    "--enable-log-outputs",
)
_IGNORED_STORE_TRUE: tuple[str, ...] = (
    "--enable-auto-tool-choice",
    "--disable-frontend-multiprocessing",
    "--disable-fastapi-docs",
    "--enable-request-id-headers",
    "--enable-prompt-tokens-details",
    "--disable-custom-all-reduce",
)

_DOTTED_MM = re.compile(r"^--limit-mm-per-prompt\.([A-Za-z_]+)(?:=(.*))?$")


@dataclass(frozen=True, slots=True)
class ServeArgs:
    """What ``vllm serve`` was asked to do, reduced to what the emulator acts on."""

    model: str
    served_model_names: tuple[str, ...]
    host: str | None = None
    port: int = 8000
    uds: str | None = None
    gpu_memory_utilization: float = 0.92
    max_model_len: int | None = None  # None: from the model; -1: largest that fits
    shutdown_timeout_s: int = 0
    kv_cache_memory_bytes: int | None = None
    enforce_eager: bool = False
    limit_mm_per_prompt: dict[str, int] = field(default_factory=dict)
    api_keys: tuple[str, ...] = ()
    disable_log_stats: bool = False
    uvicorn_log_level: str = "info"
    disable_uvicorn_access_log: bool = False
    quiet_endpoints: tuple[str, ...] = ()
    enable_sleep_mode: bool = False
    enable_server_load_tracking: bool = False
    max_num_seqs: int | None = None
    tensor_parallel_size: int = 1
    non_default: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The first served name: used in responses and as the metrics' ``model_name``."""
        return self.served_model_names[0]

    def mm_limit(self, modality: str) -> int:
        """Items of one modality allowed per prompt."""
        return self.limit_mm_per_prompt.get(modality, MM_DEFAULT_LIMIT)


def human_readable_int(text: str) -> int:
    """Sizes in vLLM's syntax: ``1k`` = 1000, ``1K`` = 1024, ``25.6k``, ``64M``, plain ints."""
    match = re.fullmatch(r"(-?\d+(?:\.\d+)?)([kKmMgGtT]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}")
    number, suffix = float(match.group(1)), match.group(2)
    decimal = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
    binary = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    scale = decimal.get(suffix) or binary.get(suffix) or 1
    value = number * scale
    if suffix == "" and not value.is_integer():
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}")
    return math.floor(value)


def _max_model_len(text: str) -> int:
    if text.strip().lower() == "auto":
        return -1
    return human_readable_int(text)


def _utilization(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"{value} is not in (0, 1]: gpu_memory_utilization is a fraction of GPU memory"
        )
    return value


def _mm_count(modality: str, value: object) -> int:
    if isinstance(value, dict):
        value = value.get("count", MM_DEFAULT_LIMIT)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise argparse.ArgumentTypeError(
            f"--limit-mm-per-prompt: {modality!r} must be a non-negative count, got {value!r}"
        )
    return value


def _mm_limits(text: str) -> dict[str, int]:
    try:
        data = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--limit-mm-per-prompt expects JSON such as '{{\"image\": 8}}', got {text!r}"
        ) from None
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError("--limit-mm-per-prompt expects a JSON object")
    return {str(k): _mm_count(str(k), v) for k, v in data.items()}


def build_parser() -> argparse.ArgumentParser:
    """The ``vllm serve`` parser (only the flags the emulator knows; others are errors)."""
    p = argparse.ArgumentParser(
        prog="vllm serve",
        usage="vllm serve [model_tag] [options]",
        description="Start the vLLM OpenAI Compatible API server (fleetd emulator).",
    )
    p.add_argument("model_tag", nargs="?", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--uds", default=None)
    p.add_argument("--served-model-name", nargs="+", default=None)
    p.add_argument(
        "--gpu-memory-utilization",
        "--device-memory-utilization",
        type=_utilization,
        default=0.92,
    )
    p.add_argument("--max-model-len", type=_max_model_len, default=None)
    p.add_argument("--shutdown-timeout", type=int, default=0)
    p.add_argument("--kv-cache-memory-bytes", type=human_readable_int, default=None)
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--limit-mm-per-prompt", type=_mm_limits, default=None)
    p.add_argument("--api-key", nargs="+", default=None)
    p.add_argument("--disable-log-stats", action="store_true")
    p.add_argument(
        "--uvicorn-log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
    )
    p.add_argument("--disable-uvicorn-access-log", action="store_true")
    p.add_argument("--enable-sleep-mode", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--enable-server-load-tracking", action="store_true")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    for names in _IGNORED_VALUE_FLAGS:
        p.add_argument(*names, default=None, help=argparse.SUPPRESS)
    for name in _IGNORED_BOOL_FLAGS:
        p.add_argument(
            name, action=argparse.BooleanOptionalAction, default=None, help=argparse.SUPPRESS
        )
    for name in _IGNORED_STORE_TRUE:
        p.add_argument(name, action="store_true", help=argparse.SUPPRESS)
    return p


def _split_dotted_mm(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Take ``--limit-mm-per-prompt.image 8`` (or ``=8``) out of argv; argparse can't see it."""
    rest: list[str] = []
    dotted: dict[str, str] = {}
    i = 0
    while i < len(argv):
        match = _DOTTED_MM.match(argv[i])
        if match is None:
            rest.append(argv[i])
            i += 1
            continue
        if match.group(2) is not None:
            dotted[match.group(1)] = match.group(2)
            i += 1
        else:
            dotted[match.group(1)] = argv[i + 1] if i + 1 < len(argv) else ""
            i += 2
    return rest, dotted


def parse_serve_args(argv: list[str], environ: dict[str, str] | None = None) -> ServeArgs:
    """Parse ``serve``'s arguments (without the word ``serve``); argparse errors exit 2."""
    env = environ if environ is not None else dict(os.environ)
    parser = build_parser()
    argv, dotted = _split_dotted_mm(argv)
    ns = parser.parse_args(argv)
    limits = dict(ns.limit_mm_per_prompt or {})
    for modality, raw in dotted.items():
        try:
            limits[modality] = _mm_count(modality, json.loads(raw))
        except (ValueError, argparse.ArgumentTypeError):
            parser.error(f"argument --limit-mm-per-prompt.{modality}: invalid value {raw!r}")
    if ns.tensor_parallel_size < 1:
        parser.error("argument --tensor-parallel-size/-tp: must be at least 1")
    if ns.max_num_seqs is not None and ns.max_num_seqs < 1:
        parser.error("argument --max-num-seqs: must be at least 1")
    model = ns.model_tag or ns.model or DEFAULT_MODEL
    names = tuple(ns.served_model_name or [model])
    api_keys = tuple(ns.api_key or ([env["VLLM_API_KEY"]] if env.get("VLLM_API_KEY") else []))
    quiet = tuple(
        p.strip() for p in (ns.disable_access_log_for_endpoints or "").split(",") if p.strip()
    )
    defaults = vars(parser.parse_args([]))
    non_default = {k: v for k, v in vars(ns).items() if v != defaults.get(k) and k != "api_key"}
    return ServeArgs(
        model=model,
        served_model_names=names,
        host=ns.host,
        port=ns.port,
        uds=ns.uds,
        gpu_memory_utilization=ns.gpu_memory_utilization,
        max_model_len=ns.max_model_len,
        shutdown_timeout_s=max(0, ns.shutdown_timeout),
        kv_cache_memory_bytes=ns.kv_cache_memory_bytes,
        enforce_eager=bool(ns.enforce_eager),
        limit_mm_per_prompt=limits,
        api_keys=api_keys,
        disable_log_stats=ns.disable_log_stats,
        uvicorn_log_level=ns.uvicorn_log_level,
        disable_uvicorn_access_log=ns.disable_uvicorn_access_log,
        quiet_endpoints=quiet,
        enable_sleep_mode=bool(ns.enable_sleep_mode),
        enable_server_load_tracking=ns.enable_server_load_tracking,
        max_num_seqs=ns.max_num_seqs,
        tensor_parallel_size=ns.tensor_parallel_size,
        non_default=non_default,
    )
