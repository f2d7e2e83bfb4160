"""What an emulated vLLM API server learns before it starts: GPUs, knobs, its socket.

Reads the simulated host (``$FLEETD_SIM_DIR``), the GPUs ``CUDA_VISIBLE_DEVICES`` shows, the
``FLEETD_SIM_*`` knobs and fault switches, and reserves the port the way vLLM's
``setup_server`` does: bound at once, listening only once the engine is ready.

No event loop here; errors are SimHostError/OSError for the caller to report and exit 1.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fleetd.sim import common
from fleetd.sim.host import SimGpuDef, SimHost, SimHostError
from fleetd.sim.vllm_spec import EngineSpec

if TYPE_CHECKING:
    from fleetd.sim.vllm_args import ServeArgs

ENV_PACE_S = "FLEETD_SIM_TOKEN_S"  # seconds per generated token (default 0.01)
ENV_SLEEP_S = "FLEETD_SIM_SLEEP_S"  # seconds a sleep or wake-up takes (default 0.5)
ENV_DEAD_EXIT_S = "FLEETD_SIM_DEAD_EXIT_S"  # engine core dead -> API exit (default 3.0)
ENV_WEIGHTS_MIB = "FLEETD_SIM_WEIGHTS_MIB"  # model weights, instead of the name's estimate
ENV_KV_KIB = "FLEETD_SIM_KV_KIB_PER_TOKEN"  # KV bytes/token (KiB), instead of the estimate


def env_float(name: str, default: float) -> float:
    """A non-negative float from the environment, or the default."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return max(0.0, float(raw))
    except ValueError:
        raise SimHostError(f"{name}={raw!r} is not a number") from None


def visible_gpus(host: SimHost, tp: int) -> list[SimGpuDef]:
    """The first ``tp`` GPUs CUDA_VISIBLE_DEVICES shows (CUDA stops at a bad entry)."""
    first = common.visible_gpu(host)  # validates like CUDA: hidden or unknown -> error
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    refs = [r.strip() for r in value.split(",")] if value is not None else []
    gpus = [first]
    for ref in refs[1:] if refs else [str(g.index) for g in host.gpus() if g != first]:
        try:
            gpus.append(host.resolve(ref))
        except SimHostError:
            break
    if len(gpus) < tp:
        raise SimHostError(
            f"World size ({tp}) is larger than the number of available GPUs ({len(gpus)}) "
            "in this node."
        )
    return gpus[:tp]


def bind(args: ServeArgs) -> tuple[socket.socket, str]:
    """Reserve the port (bind, no listen), as vLLM's setup_server does."""
    if args.uds:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(args.uds)
        return sock, f"unix:{args.uds}"
    host = args.host or ""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, args.port))
    except OSError:
        sock.close()
        raise
    shown = f"[{host}]" if family == socket.AF_INET6 else (host or "0.0.0.0")  # noqa: S104
    return sock, f"http://{shown}:{sock.getsockname()[1]}"


@dataclass(frozen=True, slots=True)
class Setup:
    """What the environment says about this engine (host, GPU, faults, pacing)."""

    gpus: list[SimGpuDef]
    spec: EngineSpec
    faults: common.Faults
    token_s: float
    dead_exit_s: float


def setup(args: ServeArgs) -> Setup:
    """Read the simulated host and the FLEETD_SIM_* knobs; SimHostError names the problem."""
    try:
        host = SimHost.from_env()
        gpus = visible_gpus(host, args.tensor_parallel_size)
    except SimHostError as exc:
        raise SimHostError(f"RuntimeError: No CUDA GPUs are available: {exc}") from None
    try:
        faults = common.Faults.from_env()
        weights = env_float(ENV_WEIGHTS_MIB, 0) if os.environ.get(ENV_WEIGHTS_MIB) else None
        kv_kib = env_float(ENV_KV_KIB, 0) if os.environ.get(ENV_KV_KIB) else None
        spec = EngineSpec(
            model=args.model,
            gpu_uuids=tuple(g.uuid for g in gpus),
            utilization=args.gpu_memory_utilization,
            kv_cache_memory_bytes=args.kv_cache_memory_bytes,
            max_model_len=args.max_model_len,
            enforce_eager=args.enforce_eager,
            load_s=common.load_time_s() + faults.slow_start_s,
            exit_on_load=faults.exit_on_load,
            leak_mib_per_s=faults.leak_mib_per_s,
            sleep_s=env_float(ENV_SLEEP_S, 0.5) if os.environ.get(ENV_SLEEP_S) else None,
            weights_override_mib=math.ceil(weights) if weights else None,
            kv_kib_override=kv_kib or None,
            shutdown_timeout_s=args.shutdown_timeout_s,
        )
        return Setup(
            gpus, spec, faults, env_float(ENV_PACE_S, 0.01), env_float(ENV_DEAD_EXIT_S, 3.0)
        )
    except SimHostError as exc:
        raise SimHostError(f"fleetd vLLM emulator: {exc}") from None
