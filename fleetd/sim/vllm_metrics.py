"""vLLM's Prometheus metrics (V1 names, reference A.5), written in the text exposition format.

prometheus_client is not a dependency the emulator can count on, and the page is small, so the
format is written here: ``# HELP``/``# TYPE`` per family, counters as ``<name>_total`` plus
``<name>_created``, histograms as ``_bucket``/``_count``/``_sum``/``_created``, labels
``{engine="0",model_name="<first served name>"}`` on every engine metric, values printed as
Python floats (``1.0``), as prometheus_client prints them.

Holds numbers only; the scheduler decides what to record.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"  # as observed from vLLM 0.32
FINISHED_REASONS = ("stop", "length", "abort", "error", "repetition")
SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")

TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


def _num(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value))


def token_buckets(max_model_len: int) -> tuple[float, ...]:
    """The 1-2-5 buckets vLLM uses up to max_model_len (for token-count histograms)."""
    out: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_model_len:
                return tuple(out)
            out.append(float(value))
        exponent += 1


@dataclass
class Histogram:
    """Cumulative buckets, sum, count."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        """Record one observation."""
        self.total += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1


class Metrics:
    """The engine metrics of one emulated vLLM; ``render`` is the /metrics page."""

    def __init__(self, model_name: str, *, max_model_len: int, cache_info: dict[str, str]) -> None:
        self.labels = f'engine="0",model_name="{_escape(model_name)}"'
        self.created = time.time()
        self.cache_info = cache_info
        self.prompt_tokens = 0.0
        self.generation_tokens = 0.0
        self.preemptions = 0.0
        self.success = dict.fromkeys(FINISHED_REASONS, 0.0)
        tokens = token_buckets(max_model_len)
        self.histograms: dict[str, tuple[str, Histogram]] = {
            "vllm:time_to_first_token_seconds": (
                "Histogram of time to first token in seconds.",
                Histogram(TTFT_BUCKETS),
            ),
            "vllm:inter_token_latency_seconds": (
                "Histogram of inter-token latency in seconds.",
                Histogram(ITL_BUCKETS),
            ),
            "vllm:e2e_request_latency_seconds": (
                "Histogram of e2e request latency in seconds.",
                Histogram(LATENCY_BUCKETS),
            ),
            "vllm:request_queue_time_seconds": (
                "Histogram of time spent in WAITING phase for request.",
                Histogram(LATENCY_BUCKETS),
            ),
            "vllm:request_prompt_tokens": (
                "Number of prefill tokens processed.",
                Histogram(tokens),
            ),
            "vllm:request_generation_tokens": (
                "Number of generation tokens processed.",
                Histogram(tokens),
            ),
        }

    def observe(self, name: str, value: float) -> None:
        """Record into one histogram by its metric name."""
        self.histograms[name][1].observe(value)

    def render(self, *, running: int, waiting: int, kv_usage: float, sleep_state: str) -> str:
        """The Prometheus text page."""
        lab = self.labels
        out: list[str] = []
        out += _family(
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            [(f"vllm:num_requests_running{{{lab}}}", running)],
        )
        out += _family(
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            [(f"vllm:num_requests_waiting{{{lab}}}", waiting)],
        )
        out += _family(
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            [(f"vllm:kv_cache_usage_perc{{{lab}}}", kv_usage)],
        )
        out += _family(
            "vllm:engine_sleep_state",
            "gauge",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine "
            "is awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means "
            "sleep level 2.",
            [
                (f'vllm:engine_sleep_state{{{lab},sleep_state="{s}"}}', float(s == sleep_state))
                for s in SLEEP_STATES
            ],
        )
        info = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(self.cache_info.items()))
        out += _family(
            "vllm:cache_config_info",
            "gauge",
            "Information of the LLMEngine CacheConfig",
            [(f"vllm:cache_config_info{{{info},{lab}}}", 1.0)],
        )
        out += self._counter("vllm:num_preemptions", "Cumulative number of preemption.", [
            ("", self.preemptions)
        ])  # fmt: skip
        out += self._counter("vllm:prompt_tokens", "Number of prefill tokens processed.", [
            ("", self.prompt_tokens)
        ])  # fmt: skip
        out += self._counter("vllm:generation_tokens", "Number of generation tokens processed.", [
            ("", self.generation_tokens)
        ])  # fmt: skip
        out += self._counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [(f',finished_reason="{r}"', v) for r, v in self.success.items()],
        )
        for name, (doc, hist) in self.histograms.items():
            out += self._histogram(name, doc, hist)
        return "\n".join(out) + "\n"

    def _counter(self, name: str, doc: str, series: list[tuple[str, float]]) -> list[str]:
        samples: list[tuple[str, float]] = []
        for extra, value in series:
            samples.append((f"{name}_total{{{self.labels}{extra}}}", value))
        for extra, _ in series:
            samples.append((f"{name}_created{{{self.labels}{extra}}}", self.created))
        return _family(name, "counter", doc, samples)

    def _histogram(self, name: str, doc: str, hist: Histogram) -> list[str]:
        lab = self.labels
        samples = [
            (f'{name}_bucket{{{lab},le="{_num(b)}"}}', float(c))
            for b, c in zip(hist.buckets, hist.counts, strict=True)
        ]
        samples += [
            (f'{name}_bucket{{{lab},le="+Inf"}}', float(hist.count)),
            (f"{name}_count{{{lab}}}", float(hist.count)),
            (f"{name}_sum{{{lab}}}", hist.total),
            (f"{name}_created{{{lab}}}", self.created),
        ]
        return _family(name, "histogram", doc, samples)


def _family(name: str, kind: str, doc: str, samples: Iterable[tuple[str, float]]) -> list[str]:
    return [
        f"# HELP {name} {doc}",
        f"# TYPE {name} {kind}",
        *(f"{key} {_num(value)}" for key, value in samples),
    ]


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
