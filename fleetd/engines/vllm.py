"""vLLM adapter: the argv, environment and readiness rules for one ``vllm serve`` replica.

Facts from shared/reference/engines-nvml-systemd.md §A: vLLM claims
``ceil(total * gpu_memory_utilization)`` and refuses to start when less is free; /health is
connection-refused while loading, then 200; the served name must appear in /v1/models;
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` makes CUDA's indices match NVML's; ``--shutdown-timeout N``
(0.32+) drains in-flight requests on SIGTERM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

    from fleetd.config import ModelSpec

# Variables that belong to fleetd's own service and must not leak into an engine: an engine
# that sent sd_notify messages on fleetd's socket would confuse systemd.
SCRUBBED_ENV = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)


@dataclass(frozen=True, slots=True)
class Launch:
    """Everything needed to start one engine process."""

    argv: tuple[str, ...]
    env: dict[str, str]
    port: int
    base_url: str


def memory_utilization(budget_mib: int, total_mib: int) -> float:
    """``--gpu-memory-utilization`` for a budget: the fraction of the card, rounded down.

    Rounded down to 3 decimals so vLLM never asks for more than the planner reserved.
    """
    if total_mib <= 0:
        raise ValueError("GPU total must be positive")
    return min(1.0, math.floor(budget_mib / total_mib * 1000) / 1000)


def engine_env(base: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """Fleetd's environment minus service-only variables, plus the engine's configured extras."""
    env = {k: v for k, v in base.items() if k not in SCRUBBED_ENV}
    env.update(extra)
    return env


def launch(
    spec: ModelSpec,
    *,
    command: tuple[str, ...],
    port: int,
    gpu_index: int,
    gpu_total_mib: int,
    base_env: Mapping[str, str],
    engine_extra_env: Mapping[str, str],
    shutdown_timeout_s: int | None,
) -> Launch:
    """Argv and env for ``vllm serve`` on one GPU, bound to loopback on ``port``."""
    util = memory_utilization(spec.budget_mib, gpu_total_mib)
    argv = [
        *command,
        "serve",
        spec.model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        spec.served,
        "--gpu-memory-utilization",
        f"{util:.3f}",
    ]
    if spec.max_model_len is not None:
        argv += ["--max-model-len", str(spec.max_model_len)]
    if shutdown_timeout_s is not None:
        argv += ["--shutdown-timeout", str(shutdown_timeout_s)]
    if spec.standby:  # every replica alike, so a promoted standby is adopted as is
        argv.append("--enable-sleep-mode")
    argv += list(spec.engine_args)
    env = engine_env(base_env, engine_extra_env)
    env.update(
        {
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "CUDA_VISIBLE_DEVICES": str(gpu_index),
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
    )
    if spec.standby:  # /sleep, /wake_up and /is_sleeping are dev-mode routes in vLLM
        env["VLLM_SERVER_DEV_MODE"] = "1"
    return Launch(tuple(argv), env, port, f"http://127.0.0.1:{port}")


def health_url(base_url: str) -> str:
    """GET here: connection refused while loading, 200 when ready, 503 when the engine died."""
    return f"{base_url}/health"


def models_url(base_url: str) -> str:
    """GET here: the served names."""
    return f"{base_url}/v1/models"


def serves(models_body: Any, served_name: str) -> bool:  # noqa: ANN401 - parsed JSON
    """Whether a /v1/models answer lists ``served_name``."""
    if not isinstance(models_body, dict):
        return False
    data = models_body.get("data")
    return isinstance(data, list) and any(
        isinstance(card, dict) and card.get("id") == served_name for card in data
    )


def sleep_url(base_url: str) -> str:
    """POST: level 1 offloads the weights to host RAM and drops the KV cache."""
    return f"{base_url}/sleep?level=1"


def wake_up_url(base_url: str) -> str:
    """POST: re-allocates the weights and the KV cache (all tags)."""
    return f"{base_url}/wake_up"


def is_sleeping_url(base_url: str) -> str:
    """GET: ``{"is_sleeping": bool}``."""
    return f"{base_url}/is_sleeping"


def metrics_url(base_url: str) -> str:
    """Prometheus text; ``vllm:num_requests_running`` tells when a drain is done."""
    return f"{base_url}/metrics"


def running_requests(metrics_text: str) -> int | None:
    """Sum of ``vllm:num_requests_running`` samples, or None when the metric is absent."""
    total = 0.0
    found = False
    for line in metrics_text.splitlines():
        if line.startswith("vllm:num_requests_running"):
            try:
                total += float(line.rsplit(" ", 1)[1])
                found = True
            except (IndexError, ValueError):
                continue
    return round(total) if found else None
