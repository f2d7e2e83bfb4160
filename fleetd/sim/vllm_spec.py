"""What the emulated API server hands its engine-core child, and how that child is titled.

Shared by both processes, so it imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
from dataclasses import asdict, dataclass

TITLE = "VLLM::EngineCore"
LABEL = "EngineCore_DP0"


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """Everything the engine core needs, sent by the API server as the first message."""

    model: str
    gpu_uuids: tuple[str, ...]
    utilization: float
    kv_cache_memory_bytes: int | None
    max_model_len: int | None
    enforce_eager: bool
    load_s: float
    exit_on_load: bool
    leak_mib_per_s: float
    sleep_s: float | None  # None: as long as moving the weights over PCIe takes
    weights_override_mib: int | None
    kv_kib_override: float | None
    shutdown_timeout_s: int

    def to_line(self) -> bytes:
        """One JSON line for the socket."""
        return (json.dumps(asdict(self)) + "\n").encode()

    @classmethod
    def from_line(cls, line: bytes) -> EngineSpec:
        """Parse the first message."""
        data = json.loads(line)
        data["gpu_uuids"] = tuple(data["gpu_uuids"])
        return cls(**data)


def set_title(title: str) -> None:
    """Title the process like vLLM does: setproctitle if present, else at least ``comm``."""
    try:
        module = importlib.import_module("setproctitle")
        module.setproctitle(title)
    except ImportError:
        pass
    if sys.platform == "linux":  # /proc/<pid>/comm, what `ps -o comm`/psutil name() show
        with contextlib.suppress(OSError, AttributeError):
            import ctypes  # noqa: PLC0415 - Linux-only, only needed here

            ctypes.CDLL(None).prctl(15, title.encode()[:15])  # 15 = PR_SET_NAME
