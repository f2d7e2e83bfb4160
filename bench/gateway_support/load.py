"""The load: wrk for requests/s and latency, a small aiohttp client for time to first token.

wrk (C, epoll, one thread here) sends the same non-streaming chat completion over keep-alive
connections in a closed loop; its Lua ``done`` hook prints one JSON line with the counts and
the latency percentiles of its histogram. Its own CPU time comes from ``RUSAGE_CHILDREN``
around the run, so the report can show that the load generator was not the limit.

Time to first token: one streaming request at a time over one keep-alive connection, the
clock from just before the request is sent to the first SSE chunk whose delta has content
(the role-only first chunk does not count). Sequential on purpose: the client's own cost is
then small and the same for every target.
"""

from __future__ import annotations

import asyncio
import json
import resource
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import psutil

from gateway_support.procs import Procs, cpu_seconds

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from pathlib import Path

WRK_THREADS = 1
_MARK = "WRKJSON "

LUA = """\
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{mark}{{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,'
    .. '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"mean_us":%f,"max_us":%d}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean, latency.max))
end
"""


def chat_body(*, model: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Say something about GPU fleets."}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def wrk_version() -> str:
    out = subprocess.run(
        ["wrk", "--version"], capture_output=True, text=True, check=False
    ).stdout  # it exits 1 after printing its usage
    return out.split(" [")[0].strip() or "wrk"


def write_script(path: Path, body: dict[str, Any], key: str) -> Path:
    path.write_text(LUA.format(body=json.dumps(body), key=key, mark=_MARK))
    return path


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: counts, latency percentiles, and the CPU it and the watched used."""

    requests: int
    duration_s: float
    errors: int  # connect, read, write, timeout errors and non-2xx/3xx answers
    p50_ms: float
    p99_ms: float
    wrk_cpu_pct: float  # % of one core
    watched_cpu_pct: dict[str, float]  # % of one core, per watched group of processes
    machine_cpu_pct: float  # all cores, % of one core (2 cores: up to 200)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0


def _parse(output: str) -> dict[str, Any]:
    for line in output.splitlines():
        if line.startswith(_MARK):
            parsed: dict[str, Any] = json.loads(line.removeprefix(_MARK))
            return parsed
    raise RuntimeError(f"wrk printed no summary:\n{output[-2000:]}")


def _machine_busy_s() -> float:
    """CPU seconds all cores spent on anything but idling (guest time is inside user)."""
    times = psutil.cpu_times()
    busy = ("user", "nice", "system", "irq", "softirq", "steal")
    return float(sum(getattr(times, name, 0.0) for name in busy))


class WrkRun:
    """A wrk run in the background; ``result()`` waits for it (or ends it early)."""

    def __init__(
        self,
        procs: Procs,
        url: str,
        script: Path,
        *,
        connections: int,
        duration_s: float,
        watch: dict[str, Callable[[], Iterable[int]]] | None = None,
    ) -> None:
        self._procs = procs
        self._watch = watch or {}
        self._pids = {name: list(pids()) for name, pids in self._watch.items()}
        self._cpu0 = {name: cpu_seconds(p) for name, p in self._pids.items()}
        self._busy0 = _machine_busy_s()
        self._rusage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._t0 = time.monotonic()
        self.duration_s = duration_s
        self.proc = procs.start(
            "wrk",
            [
                "wrk", "-t", str(min(WRK_THREADS, connections)), "-c", str(connections),
                "-d", f"{max(1, round(duration_s))}s", "--timeout", "10s", "-s", str(script),
                url,
            ],
            pipe_stdout=True,
            group=False,
        )  # fmt: skip

    def result(self, *, interrupt: bool = False) -> WrkResult:
        """Wait for wrk's summary; with ``interrupt``, end the run now (SIGINT: it reports)."""
        if interrupt:
            self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=self.duration_s + 30)
        wall = time.monotonic() - self._t0
        self._procs.forget(self.proc)
        rusage = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy = _machine_busy_s() - self._busy0
        wrk_cpu = (rusage.ru_utime + rusage.ru_stime) - (
            self._rusage0.ru_utime + self._rusage0.ru_stime
        )
        watched = {
            name: 100 * (cpu_seconds(self._pids[name]) - self._cpu0[name]) / wall
            for name in self._watch
        }
        data = _parse(out.decode(errors="replace"))
        errors = sum(int(data[k]) for k in ("connect", "read", "write", "status", "timeout"))
        return WrkResult(
            requests=int(data["requests"]),
            duration_s=int(data["duration_us"]) / 1e6,
            errors=errors,
            p50_ms=int(data["p50_us"]) / 1e3,
            p99_ms=int(data["p99_us"]) / 1e3,
            wrk_cpu_pct=100 * wrk_cpu / wall,
            watched_cpu_pct=watched,
            machine_cpu_pct=100 * busy / wall,
        )


def run_wrk(
    procs: Procs,
    url: str,
    script: Path,
    *,
    connections: int,
    duration_s: float,
    watch: dict[str, Callable[[], Iterable[int]]] | None = None,
) -> WrkResult:
    return WrkRun(
        procs, url, script, connections=connections, duration_s=duration_s, watch=watch
    ).result()


@dataclass(frozen=True)
class StreamResult:
    """Times to the first content chunk (s), and content chunks per stream."""

    ttft_s: list[float]
    chunks: list[int]


async def _one_stream(
    session: aiohttp.ClientSession, url: str, payload: bytes, headers: dict[str, str]
) -> tuple[float, int]:
    start = time.perf_counter()
    first: float | None = None
    chunks = 0
    async with session.post(url, data=payload, headers=headers) as resp:
        if resp.status != 200:
            text = (await resp.read())[:300].decode(errors="replace")
            raise RuntimeError(f"{url}: HTTP {resp.status}: {text}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            choices = json.loads(line[5:]).get("choices") or [{}]
            if (choices[0].get("delta") or {}).get("content"):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - start
    if first is None:
        raise RuntimeError(f"{url}: the stream had no content chunk")
    return first, chunks


async def _streams(url: str, body: dict[str, Any], key: str, count: int) -> StreamResult:
    payload = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=1)
    ttft: list[float] = []
    chunks: list[int] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await _one_stream(session, url, payload, headers)  # opens the connection: not timed
        for _ in range(count):
            first, n = await _one_stream(session, url, payload, headers)
            ttft.append(first)
            chunks.append(n)
    return StreamResult(ttft, chunks)


def measure_ttft(url: str, body: dict[str, Any], key: str, count: int) -> StreamResult:
    return asyncio.run(_streams(url, body, key, count))


async def _one_request(url: str, body: dict[str, Any], key: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(url, json=body, headers=headers) as resp,
    ):
        text = await resp.text()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {text[:300]}")
        answer: dict[str, Any] = json.loads(text)
        return answer


def check_chat(url: str, body: dict[str, Any], key: str) -> str | None:
    """None when one non-streaming completion works through ``url``; else what went wrong."""
    try:
        answer = asyncio.run(_one_request(url, body, key))
    except (aiohttp.ClientError, OSError, TimeoutError, RuntimeError, ValueError) as exc:
        return str(exc) or type(exc).__name__
    content = ((answer.get("choices") or [{}])[0].get("message") or {}).get("content")
    return None if content else f"no message content in {json.dumps(answer)[:300]}"
