"""What the engine emulators share: which simulated GPU they run on, fault switches, fake text.

Emulators are started the way fleetd starts real engines (argv + environment), so everything
test-specific arrives through the environment:

- ``FLEETD_SIM_DIR``: the simulated host (see ``fleetd.sim.host``).
- ``CUDA_VISIBLE_DEVICES``: the GPU, by index or UUID, as for the real engines.
- ``FLEETD_SIM_LOAD_S``: seconds the model takes to load (default 1.0).
- ``FLEETD_SIM_FAULTS``: comma-separated start-time faults, e.g.
  ``crash_after_s=5,leak_mib_per_s=64``; see ``Faults``.

At run time two signals act as switches: SIGUSR1 makes the engine hang (it stops answering
HTTP, as a deadlocked engine does), SIGUSR2 makes it crash at once (exit 1).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, fields

from fleetd.sim.host import SimGpuDef, SimHost, SimHostError

ENV_LOAD_S = "FLEETD_SIM_LOAD_S"
ENV_FAULTS = "FLEETD_SIM_FAULTS"


@dataclass(frozen=True, slots=True)
class Faults:
    """Start-time fault switches for an emulated engine."""

    crash_after_s: float | None = None  # exit 1 this long after becoming ready
    hang_after_s: float | None = None  # stop answering this long after becoming ready
    exit_on_load: bool = False  # fail while loading (exit 1 with an engine-like error)
    leak_mib_per_s: float = 0.0  # grow the VRAM claim while ready (a leaking engine)
    slow_start_s: float = 0.0  # added to the load time

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Faults:
        """Parse ``FLEETD_SIM_FAULTS``; an unknown or malformed switch is an error, not ignored."""
        text = (environ if environ is not None else os.environ).get(ENV_FAULTS, "").strip()
        if not text:
            return cls()
        known = {f.name: f for f in fields(cls)}
        values: dict[str, float | bool] = {}
        for item in text.split(","):
            key, _, raw = item.strip().partition("=")
            if key not in known:
                raise SimHostError(
                    f"{ENV_FAULTS}: unknown fault {key!r}; known: {', '.join(sorted(known))}"
                )
            if key == "exit_on_load":
                values[key] = raw.lower() in {"", "1", "true", "yes"}
                continue
            try:
                values[key] = float(raw)
            except ValueError:
                raise SimHostError(f"{ENV_FAULTS}: {key}={raw!r} is not a number") from None
        return cls(**values)  # type: ignore[arg-type]


def load_time_s(environ: dict[str, str] | None = None) -> float:
    """Model load time for the emulators (``FLEETD_SIM_LOAD_S``, default 1 s)."""
    raw = (environ if environ is not None else os.environ).get(ENV_LOAD_S, "1.0")
    try:
        return max(0.0, float(raw))
    except ValueError:
        raise SimHostError(f"{ENV_LOAD_S}={raw!r} is not a number of seconds") from None


def visible_gpu(host: SimHost, environ: dict[str, str] | None = None) -> SimGpuDef:
    """The GPU named first in CUDA_VISIBLE_DEVICES (index or UUID), as CUDA would pick it."""
    env = environ if environ is not None else os.environ
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return host.resolve("0")
    first = value.split(",")[0].strip()
    if not first or first.startswith("-"):
        raise SimHostError(f"CUDA_VISIBLE_DEVICES={value!r} hides every GPU: no CUDA device")
    return host.resolve(first)


_WORDS = (
    "the",
    "fleet",
    "keeps",
    "models",
    "warm",
    "on",
    "every",
    "card",
    "while",
    "the",
    "gateway",
    "routes",
    "each",
    "request",
    "to",
    "a",
    "ready",
    "replica",
    "and",
    "the",
    "planner",
    "explains",
    "why",
    "a",
    "model",
    "waits",
    "for",
    "memory",
)


def fake_tokens(prompt: str, count: int) -> list[str]:
    """``count`` deterministic word tokens derived from the prompt (same prompt, same text)."""
    seed = hashlib.sha256(prompt.encode()).digest()
    return [
        ("" if i == 0 else " ") + _WORDS[(seed[i % len(seed)] + i) % len(_WORDS)]
        for i in range(count)
    ]
