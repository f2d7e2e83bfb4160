"""The Ollama emulator's settings, parsed from the environment exactly as ``envconfig`` does.

Pure: no I/O beyond reading the mapping it is given. Problems that real Ollama only logs
(an invalid integer falls back to the default) come back as warning strings for the caller
to log; it must not raise for them, because ``ollama serve`` does not refuse to start.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from fleetd.sim import common

VERSION = "0.33.0"  # the Ollama version emulated, as /api/version reports it
ENV_PACE_S = "FLEETD_SIM_TOKEN_S"
DEFAULT_PORT = 11434
DEFAULT_KEEP_ALIVE_S = 300.0
FOREVER = math.inf  # keep_alive < 0: Go stores MaxInt64 nanoseconds (~292 years)
MAX_DURATION_S = (2**63 - 1) / 1e9

_UNITS_S = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # Go accepts both micro signs
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


class DurationError(ValueError):
    """A string is not a Go duration; the message is Go's (``time: invalid duration "x"``)."""


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration (``5m``, ``1h30m``, ``-1s``, ``0``), as time.ParseDuration."""
    quoted = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    body = text
    sign = 1.0
    if body and body[0] in "+-":
        sign = -1.0 if body[0] == "-" else 1.0
        body = body[1:]
    if body == "0":
        return 0.0
    if not body:
        raise DurationError(f"time: invalid duration {quoted}")
    total = 0.0
    pos = 0
    while pos < len(body):
        match = _PART.match(body, pos)
        if match is None:
            if re.fullmatch(r"\d+\.?\d*|\.\d+", body[pos:]):
                raise DurationError(f"time: missing unit in duration {quoted}")
            raise DurationError(f"time: invalid duration {quoted}")
        total += float(match.group(1)) * _UNITS_S[match.group(2)]
        pos = match.end()
    return sign * total


def keep_alive_from_json(value: object) -> float:
    """A request's ``keep_alive`` (api.Duration): seconds, or FOREVER when negative.

    Numbers are seconds, strings are Go durations (a bare ``"300"`` is an error, as in Go).
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise DurationError(f"Unsupported type: '{type(value).__name__}'")
    seconds = float(value) if not isinstance(value, str) else parse_go_duration(value)
    return FOREVER if seconds < 0 else seconds


def parse_host(raw: str) -> tuple[str, str, int]:
    """``[scheme://]host[:port][/path]`` as envconfig.Host() reads it: (scheme, host, port)."""
    text = raw.strip().strip("\"'")
    default_port = DEFAULT_PORT
    scheme, sep, hostport = text.partition("://")
    if not sep:
        scheme, hostport = "http", text
    elif scheme == "http":
        default_port = 80
    elif scheme == "https":
        default_port = 443
    hostport = hostport.split("/", 1)[0]
    host, port_text = _split_host_port(hostport)
    if host is None:
        port_text = str(default_port)
        bare = hostport.strip("[]")
        host = bare or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        port = default_port
    if not 0 <= port <= 65535:
        port = default_port
    return scheme, host, port


def _split_host_port(hostport: str) -> tuple[str | None, str]:
    # net.SplitHostPort: needs a colon; IPv6 literals need brackets
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0 or not hostport[end + 1 :].startswith(":"):
            return None, ""
        return hostport[1:end], hostport[end + 2 :]
    if hostport.count(":") != 1:
        return None, ""
    host, port = hostport.split(":")
    return host, port


@dataclass(frozen=True, slots=True)
class OllamaEnv:
    """Everything ``ollama serve`` (emulated) reads from its environment."""

    scheme: str = "http"
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S
    max_loaded_models: int = 0  # 0 = auto: 3 per GPU
    num_parallel: int = 1
    max_queue: int = 512
    gpu_overhead_bytes: int = 0
    context_length: int = 0  # 0 = auto, from total VRAM
    token_s: float = 0.01
    load_s: float = 1.0
    faults: common.Faults = field(default_factory=common.Faults)
    warnings: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, environ: dict[str, str]) -> OllamaEnv:
        """Parse; invalid numbers fall back to defaults with a warning, as Ollama does."""
        warnings: list[str] = []

        def var(key: str) -> str:
            return environ.get(key, "").strip().strip("\"'")

        def uint(key: str, default: int) -> int:
            text = var(key)
            if not text:
                return default
            if text.isdigit():
                return int(text)
            warnings.append(
                f'invalid environment variable, using default key={key} value="{text}" '
                f"default={default}"
            )
            return default

        scheme, host, port = parse_host(var("OLLAMA_HOST"))
        token_text = var(ENV_PACE_S) or "0.01"
        try:
            token_s = max(0.0, float(token_text))
        except ValueError:
            warnings.append(f"{ENV_PACE_S}={token_text!r} is not a number; using 0.01")
            token_s = 0.01
        return cls(
            scheme=scheme,
            host=host,
            port=port,
            keep_alive_s=_env_keep_alive(var("OLLAMA_KEEP_ALIVE")),
            max_loaded_models=uint("OLLAMA_MAX_LOADED_MODELS", 0),
            num_parallel=max(1, uint("OLLAMA_NUM_PARALLEL", 1)),
            max_queue=uint("OLLAMA_MAX_QUEUE", 512),
            gpu_overhead_bytes=uint("OLLAMA_GPU_OVERHEAD", 0),
            context_length=uint("OLLAMA_CONTEXT_LENGTH", 0),
            token_s=token_s,
            load_s=common.load_time_s(environ),
            faults=common.Faults.from_env(environ),
            warnings=tuple(warnings),
        )


def _env_keep_alive(text: str) -> float:
    # envconfig.KeepAlive: a Go duration, else integer seconds, else the default; < 0 = forever
    if not text:
        return DEFAULT_KEEP_ALIVE_S
    try:
        seconds = parse_go_duration(text)
    except DurationError:
        try:
            seconds = float(int(text))
        except ValueError:
            return DEFAULT_KEEP_ALIVE_S
    return FOREVER if seconds < 0 else seconds
