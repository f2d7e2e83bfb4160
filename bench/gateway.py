"""Gateway benchmark: fleetd's OpenAI-compatible gateway against direct, nginx and LiteLLM.

Prints figures and ratios; asserts nothing about time (these machines are noisy). All in one
run on one machine, against the SAME emulated vLLM process (``fleetd.sim.vllm``, the first
replica of a ``fleetd demo`` fleet), so that the ratios compare the proxies and nothing else:

1. direct to the backend; 2. nginx as a reverse proxy; 3. LiteLLM's proxy; 4. fleetd's
   gateway (``[gateway] port``, routing ``"model": "tiny"`` to that worker).

Per target, in rounds that interleave the targets (a different order each round), medians
over the rounds:

- requests/s: non-streaming chat completions, wrk at a fixed concurrency (closed loop);
- latency p50/p99 at light load (a few connections) and what the proxy adds to direct's;
- time to first token p50/p99: streaming chat completions one at a time (aiohttp client),
  to the first SSE chunk with content;
- the CPU each process used during the requests/s runs (wrk, the backend, the proxy, the
  rest of the machine) and CPU microseconds per request: what limited throughput, and each
  proxy's cost independent of the closed loop's dynamics.

The load generator is wrk (C, one thread): it uses a few % of a core here, and its ceiling is
measured and printed (nginx answering the same POST itself), tens of times above the
rates measured; the TTFT client is sequential, so its own cost is small and equal for all.

Then supervision under gateway load (only where fleetd's gateway answers): with 2 replicas,
kill -9 one replica's engine, with no load and while wrk saturates the gateway, and time
crash seen -> restart issued -> ready from fleetd's events, and when ``fleetctl status``
(its client, polled) shows the new pid and then ready.

Setup once: ``scripts/bench_deps.sh`` (nginx and wrk from Debian, LiteLLM in its own venv).
A target that cannot be had is reported as not available and the rest goes on.

Usage: .venv/bin/python bench/gateway.py [--quick] [--rounds N] [--connections N]
           [--skip nginx,litellm,fleetd] [--keep] [--json FILE]
Default run ~2.5 minutes; --quick ~35 s (~25 s with --skip litellm).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway_support import load
from gateway_support.fleet import MODEL, Fleet, ts
from gateway_support.procs import Procs, exit_on_sigterm, tree, wait_until
from gateway_support.proxies import (
    API_KEY,
    CEILING_PATH,
    Target,
    Unavailable,
    start_litellm,
    start_nginx,
)

from fleetd.cli.fleetctl_client import ClientError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from fleetd.api.schemas import WorkerJson


ORDER = ("direct", "nginx", "litellm", "fleetd")
Warm = Callable[[Target], None]


@dataclass(frozen=True)
class Settings:
    """How long and how hard; ``--quick`` is the smoke-test set."""

    rounds: int = 3
    throughput_s: int = 5
    latency_s: int = 3
    streams: int = 40
    connections: int = 128
    latency_connections: int = 4
    saturate_connections: int = 512  # supervision phase: enough to keep fleetd's loop busy
    warmup_s: int = 1
    kills: int = 2
    token_s: float = 0.002
    max_tokens: int = 16


QUICK = Settings(rounds=1, throughput_s=2, latency_s=1, streams=10, kills=1)


@dataclass
class Round:
    """One target's figures in one round."""

    latency: load.WrkResult
    throughput: load.WrkResult
    streams: load.StreamResult


@dataclass
class Kill:
    """Seconds from kill -9 to each step (events: fleetd's clock; status: polled)."""

    crash_seen_s: float
    restart_issued_s: float
    status_new_pid_s: float
    ready_s: float
    status_ready_s: float


@dataclass
class Scripts:
    """wrk's Lua script (non-streaming completion) and the streaming request's body."""

    nonstream: Path
    body_stream: dict[str, Any]


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated; the value itself for one sample."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- the targets ------------------------------------------------------------------------------


def probe_gateway(fleet: Fleet, body: dict[str, Any]) -> Target | Unavailable:
    """fleetd's gateway, if it answers a chat completion within a few seconds."""
    target = Target(
        "fleetd", "fleetd gateway", fleet.gateway_url,
        "fleetd's gateway (in the fleetd daemon process)", fleet.daemon_pids,
    )  # fmt: skip
    problem: str | None = None

    def works() -> bool:
        nonlocal problem
        problem = load.check_chat(target.chat_url, body, API_KEY)
        return problem is None

    try:
        wait_until("fleetd's gateway", works, timeout_s=5, interval_s=0.2)
    except TimeoutError:
        return Unavailable(
            "fleetd", "fleetd gateway", f"{problem} at {fleet.gateway_url}", "not reachable"
        )
    return target


def _usable(item: Target | Unavailable, body: dict[str, Any], warm_up: Warm) -> Target | None:
    """The target, checked with one completion and warmed up; or None, said why."""
    if isinstance(item, Target):
        problem = load.check_chat(item.chat_url, body, API_KEY)
        if problem is None:
            warm_up(item)
            return item
        item = Unavailable(item.key, item.label, problem)
    print(f"{item.label}: {item.verdict} ({item.reason})", flush=True)
    return None


def gather_targets(
    procs: Procs,
    tmp: Path,
    fleet: Fleet,
    *,
    body: dict[str, Any],
    skip: frozenset[str],
    warm_up: Warm,
) -> list[Target]:
    """The targets that work here, in ORDER; each checked and warmed up."""
    backend = fleet.backend()
    port, pid = backend["port"], backend["pid"]
    assert port is not None
    assert pid is not None

    def skipped(key: str, label: str) -> Unavailable:
        return Unavailable(key, label, "--skip", "skipped")

    # LiteLLM takes seconds to import: start it first, and use the time for the others
    litellm = (
        skipped("litellm", "litellm")
        if "litellm" in skip
        else start_litellm(procs, tmp / "litellm", port, MODEL)
    )
    found: dict[str, Target | None] = {}
    direct = Target(
        "direct", "direct", f"http://127.0.0.1:{port}",
        f"emulated vLLM (fleetd.sim.vllm, pid {pid}), replica {backend['name']!r}",
    )  # fmt: skip
    found["direct"] = _usable(direct, body, warm_up)
    if found["direct"] is None:
        raise RuntimeError(f"the backend itself does not answer at {direct.url}")
    nginx = (
        skipped("nginx", "nginx") if "nginx" in skip else start_nginx(procs, tmp / "nginx", port)
    )
    found["nginx"] = _usable(nginx, body, warm_up)
    gateway = (
        skipped("fleetd", "fleetd gateway") if "fleetd" in skip else probe_gateway(fleet, body)
    )
    found["fleetd"] = _usable(gateway, body, warm_up)
    found["litellm"] = _usable(litellm if isinstance(litellm, Unavailable) else litellm(),
                               body, warm_up)  # fmt: skip
    return [t for key in ORDER if (t := found.get(key)) is not None]


# -- the measurements -------------------------------------------------------------------------


def measure_round(
    procs: Procs, target: Target, backend_pid: int, scripts: Scripts, s: Settings
) -> Round:
    url = target.chat_url
    latency = load.run_wrk(
        procs, url, scripts.nonstream, connections=s.latency_connections, duration_s=s.latency_s
    )
    throughput = load.run_wrk(
        procs, url, scripts.nonstream, connections=s.connections, duration_s=s.throughput_s,
        watch={"backend": lambda: tree(backend_pid), "proxy": target.pids},
    )  # fmt: skip
    streams = load.measure_ttft(url, scripts.body_stream, API_KEY, s.streams)
    return Round(latency, throughput, streams)


def run_rounds(
    procs: Procs, targets: list[Target], backend_pid: int, scripts: Scripts, s: Settings
) -> dict[str, list[Round]]:
    results: dict[str, list[Round]] = {t.key: [] for t in targets}
    for r in range(s.rounds):
        order = targets[r % len(targets) :] + targets[: r % len(targets)]
        progress(f"round {r + 1}/{s.rounds}: {', '.join(t.key for t in order)}")
        for target in order:
            results[target.key].append(measure_round(procs, target, backend_pid, scripts, s))
    return results


# -- supervision under load -------------------------------------------------------------------


def _is(worker: str, state: str | None = None) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("worker") == worker and (state is None or e.get("new") == state)


def kill_once(fleet: Fleet, victim: str) -> Kill:
    """kill -9 the victim's engine; time the way back, from events and from status."""
    old = fleet.workers()[victim]["pid"]
    assert old is not None
    mark = fleet.events.mark()
    t_kill = time.time()
    os.kill(old, signal.SIGKILL)
    new_pid_at: float | None = None
    ready_at: float | None = None
    deadline = time.monotonic() + 60
    while ready_at is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{victim} was not ready again within 60 s of kill -9")
        try:
            worker: WorkerJson = fleet.workers()[victim]
        except ClientError:  # slow to answer under load: that is part of the figure
            continue
        now = time.time()
        if worker["pid"] not in (None, old):
            new_pid_at = new_pid_at or now
            if worker["state"] == "ready":
                ready_at = now
        time.sleep(0.02)
    assert new_pid_at is not None
    seen = fleet.events.wait(_is(victim), start=mark)
    started = fleet.events.wait(_is(victim, "starting"), start=mark)
    ready = fleet.events.wait(_is(victim, "ready"), start=mark)
    return Kill(
        crash_seen_s=ts(seen) - t_kill,
        restart_issued_s=ts(started) - t_kill,
        status_new_pid_s=new_pid_at - t_kill,
        ready_s=ts(ready) - t_kill,
        status_ready_s=ready_at - t_kill,
    )


SETTLE_S = 2.5  # ready for longer than backoff_max_s: the next kill is a first crash again


def kills(fleet: Fleet, victim: str, count: int) -> list[Kill]:
    out = []
    for _ in range(count):
        since = fleet.workers()[victim]["since_s"]  # in its current state (ready)
        time.sleep(max(0.0, SETTLE_S - since))
        out.append(kill_once(fleet, victim))
        fleet.wait_ready(2)
    return out


@dataclass
class Supervision:
    idle: list[Kill]
    loaded: list[Kill]
    load: load.WrkResult


def supervision(procs: Procs, fleet: Fleet, scripts: Scripts, s: Settings) -> Supervision:
    progress("supervision: scaling to 2 replicas; kill -9 with no load, then under load")
    fleet.scale(2)
    victim = MODEL  # the first replica; the gateway still has the second to route to
    idle = kills(fleet, victim, s.kills)
    run = load.WrkRun(
        procs, f"{fleet.gateway_url}/v1/chat/completions", scripts.nonstream,
        connections=s.saturate_connections, duration_s=600,
        watch={"fleetd": fleet.daemon_pids},
    )  # fmt: skip
    try:
        time.sleep(1.5)  # up to speed
        loaded = kills(fleet, victim, s.kills)
    except BaseException:
        procs.stop(run.proc)
        raise
    return Supervision(idle, loaded, run.result(interrupt=True))


# -- the report -------------------------------------------------------------------------------


def print_header(targets: list[Target], s: Settings, ceiling: float | None) -> None:
    cores = os.cpu_count() or 0
    stream_ms = s.max_tokens * s.token_s * 1e3
    print()
    print(
        f"backend: one emulated vLLM process, {s.max_tokens} tokens per completion at "
        f"FLEETD_SIM_TOKEN_S={s.token_s} (~{stream_ms:.0f} ms of generation); "
        f"machine: {cores} cores, shared by everything below"
    )
    for t in targets:
        print(f"  {t.label:<15} {t.url:<24} {t.note}")
    print(
        f"load: {load.wrk_version()}, {load.WRK_THREADS} thread, keep-alive, non-streaming "
        f"chat completions: req/s at {s.connections} connections ({s.throughput_s} s), latency "
        f"at {s.latency_connections} connections ({s.latency_s} s); TTFT: Python aiohttp, "
        f"{s.streams} sequential streams; {s.rounds} round(s), targets interleaved, medians"
    )
    if ceiling is not None:
        print(
            f"load generator ceiling: wrk gets {ceiling:,.0f} req/s from nginx answering the "
            "same POST itself (no backend)"
        )
    print()


def summarize(results: dict[str, list[Round]]) -> dict[str, dict[str, float]]:
    """Medians over rounds per target; added latency against direct's in the same round."""
    direct = results["direct"]
    out: dict[str, dict[str, float]] = {}
    for key, rounds in results.items():
        tp = [r.throughput for r in rounds]
        out[key] = {
            "rps": med([t.rps for t in tp]),
            "errors": sum(t.errors for t in tp),
            "p50_ms": med([r.latency.p50_ms for r in rounds]),
            "p99_ms": med([r.latency.p99_ms for r in rounds]),
            "added_p50_ms": med(
                [r.latency.p50_ms - d.latency.p50_ms for r, d in zip(rounds, direct, strict=True)]
            ),
            "added_p99_ms": med(
                [r.latency.p99_ms - d.latency.p99_ms for r, d in zip(rounds, direct, strict=True)]
            ),
            "ttft_p50_ms": med([1e3 * pct(r.streams.ttft_s, 50) for r in rounds]),
            "ttft_p99_ms": med([1e3 * pct(r.streams.ttft_s, 99) for r in rounds]),
            "chunks": med([med(r.streams.chunks) for r in rounds]),
            "cpu_wrk": med([t.wrk_cpu_pct for t in tp]),
            "cpu_backend": med([t.watched_cpu_pct["backend"] for t in tp]),
            "cpu_proxy": med([t.watched_cpu_pct["proxy"] for t in tp]),
            "cpu_machine": med([t.machine_cpu_pct for t in tp]),
        }
    return out


def print_table(targets: list[Target], summary: dict[str, dict[str, float]]) -> None:
    nginx = summary.get("nginx", {}).get("rps")
    direct = summary["direct"]["rps"]
    print(
        f"{'target':<15} {'req/s':>7} {'x nginx':>7} {'x direct':>8} {'errors':>6} "
        f"{'lat p50':>7} {'lat p99':>7} {'+p50':>6} {'+p99':>6} "
        f"{'TTFT p50':>8} {'TTFT p99':>8} {'+TTFT':>6} {'chunks':>6}"
    )
    for t in targets:
        row = summary[t.key]
        vs_nginx = f"{row['rps'] / nginx:7.2f}" if nginx else f"{'-':>7}"
        print(
            f"{t.label:<15} {row['rps']:7.0f} {vs_nginx} {row['rps'] / direct:8.2f} "
            f"{row['errors']:6.0f} {row['p50_ms']:7.1f} {row['p99_ms']:7.1f} "
            f"{row['added_p50_ms']:+6.1f} {row['added_p99_ms']:+6.1f} "
            f"{row['ttft_p50_ms']:8.1f} {row['ttft_p99_ms']:8.1f} "
            f"{row['ttft_p50_ms'] - summary['direct']['ttft_p50_ms']:+6.1f} {row['chunks']:6.0f}"
        )
    print(
        "(latency and TTFT in ms; +p50/+p99/+TTFT: added to direct's, per round, median; "
        "errors: failed or non-2xx requests in the req/s runs; chunks: content chunks per stream)"
    )
    print()
    print("CPU during the req/s runs, % of one core (all cores: 100 x cores), and per request:")
    print(
        f"{'target':<15} {'wrk':>5} {'backend':>7} {'proxy':>6} {'others':>6} {'machine':>7}"
        f" {'backend us/req':>14} {'proxy us/req':>12}"
    )
    for t in targets:
        row = summary[t.key]
        others = row["cpu_machine"] - row["cpu_wrk"] - row["cpu_backend"] - row["cpu_proxy"]
        per_req = 1e6 / 100 / row["rps"] if row["rps"] else float("nan")  # % of a core -> us
        proxy_us = f"{row['cpu_proxy'] * per_req:12.0f}" if t.key != "direct" else f"{'-':>12}"
        print(
            f"{t.label:<15} {row['cpu_wrk']:5.0f} {row['cpu_backend']:7.0f} "
            f"{row['cpu_proxy']:6.0f} {max(others, 0.0):6.0f} {row['cpu_machine']:7.0f}"
            f" {row['cpu_backend'] * per_req:14.0f} {proxy_us}"
        )
    print(
        "(others: everything else on the machine meanwhile: kernel, fleetd's supervision, this "
        "client, other users' processes; us/req: CPU microseconds per request)"
    )


def print_supervision(sup: Supervision, s: Settings, light_p50_ms: float) -> None:
    print()
    print(
        f"Supervision under gateway load: kill -9 of the engine of worker {MODEL!r} (the first "
        f"of 2 replicas; the gateway can route to the other), {s.kills} kill(s) each, medians, s"
    )
    print(f"{'kill -9 ->':<34} {'no load':>8} {'gateway saturated':>18} {'ratio':>6}")
    rows = [
        ("crash seen (event)", "crash_seen_s"),
        ("restart issued (event)", "restart_issued_s"),
        ("status shows the new pid", "status_new_pid_s"),
        ("ready (event)", "ready_s"),
        ("status shows ready", "status_ready_s"),
    ]
    for label, attr in rows:
        idle = med([getattr(k, attr) for k in sup.idle])
        loaded = med([getattr(k, attr) for k in sup.loaded])
        print(f"{label:<34} {idle:8.3f} {loaded:18.3f} {loaded / idle:6.2f}")
    lo = sup.load
    print(
        f"load meanwhile: wrk at {s.saturate_connections} connections through the gateway, "
        f"{lo.rps:,.0f} req/s, p50 latency {lo.p50_ms:.0f} ms ({light_p50_ms:.0f} ms at "
        f"{s.latency_connections} connections: requests queue), {lo.errors} of {lo.requests} "
        "requests failed;\n"
        f"  fleetd (daemon + gateway, one process) used {lo.watched_cpu_pct['fleetd']:.0f} % "
        f"of a core, the machine {lo.machine_cpu_pct:.0f} % of {100 * (os.cpu_count() or 1)} %"
    )


# -- main -------------------------------------------------------------------------------------


def write_scripts(tmp: Path, s: Settings) -> Scripts:
    body = load.chat_body(model=MODEL, max_tokens=s.max_tokens, stream=False)
    return Scripts(
        nonstream=load.write_script(tmp / "chat.lua", body, API_KEY),
        body_stream=load.chat_body(model=MODEL, max_tokens=s.max_tokens, stream=True),
    )


STARTED = time.monotonic()


def progress(text: str) -> None:
    print(f"[{time.monotonic() - STARTED:4.0f} s] {text}", flush=True)


def run(procs: Procs, tmp: Path, s: Settings, skip: frozenset[str]) -> dict[str, Any]:
    fleet = Fleet(procs, tmp / "fleet", token_s=s.token_s)
    fleet.wait_ready(1)
    progress(f"fleetd demo up (pid {fleet.pid}), {MODEL} ready")
    backend_pid = fleet.backend()["pid"]
    assert backend_pid is not None
    scripts = write_scripts(tmp, s)

    def warm_up(target: Target) -> None:  # connections, caches, first-request paths
        load.run_wrk(
            procs, target.chat_url, scripts.nonstream, connections=s.connections,
            duration_s=s.warmup_s,
        )  # fmt: skip

    check_body = load.chat_body(model=MODEL, max_tokens=s.max_tokens, stream=False)
    targets = gather_targets(procs, tmp, fleet, body=check_body, skip=skip, warm_up=warm_up)
    progress(f"targets ready: {', '.join(t.key for t in targets)}")
    ceiling = None
    nginx = next((t for t in targets if t.key == "nginx"), None)
    if nginx is not None:
        ceiling = load.run_wrk(
            procs, nginx.url + CEILING_PATH, scripts.nonstream, connections=s.connections,
            duration_s=max(1, s.throughput_s // 2),
        ).rps  # fmt: skip
    print_header(targets, s, ceiling)
    results = run_rounds(procs, targets, backend_pid, scripts, s)
    print()
    summary = summarize(results)
    print_table(targets, summary)
    sup: Supervision | None = None
    if any(t.key == "fleetd" for t in targets):
        print()
        sup = supervision(procs, fleet, scripts, s)
        print_supervision(sup, s, summary["fleetd"]["p50_ms"])
    else:
        why = (
            "skipped (--skip fleetd)"
            if "fleetd" in skip
            else "not available (fleetd gateway not reachable)"
        )
        print(f"\nsupervision under gateway load: {why}")
    print(f"\nwhole run: {time.monotonic() - STARTED:.0f} s")
    return {
        "settings": asdict(s),
        "load_generator_ceiling_rps": ceiling,
        "summary": summary,
        "rounds": {k: [asdict(r) for r in v] for k, v in results.items()},
        "supervision": asdict(sup) if sup else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a ~30 s smoke run")
    parser.add_argument("--rounds", type=int, help=f"default {Settings.rounds}")
    parser.add_argument("--connections", type=int, help=f"default {Settings.connections}")
    parser.add_argument(
        "--skip", default="", help="targets to leave out, comma-separated: nginx,litellm,fleetd"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    s = QUICK if args.quick else Settings()
    if args.rounds:
        s = Settings(**{**asdict(s), "rounds": args.rounds})
    if args.connections:
        s = Settings(**{**asdict(s), "connections": args.connections})
    skip = frozenset(k for k in args.skip.split(",") if k)
    if not skip <= set(ORDER[1:]):
        parser.error(f"--skip: unknown target(s) {', '.join(sorted(skip - set(ORDER[1:])))}")
    if load.wrk_binary() is None:
        print("wrk not found: run scripts/bench_deps.sh (Debian package wrk)")
        return 2
    exit_on_sigterm()
    tmp = Path(tempfile.mkdtemp(prefix="fleetd-bench-gateway-"))
    keep = args.keep
    try:
        with Procs() as procs:
            raw = run(procs, tmp, s, skip)
    except (KeyboardInterrupt, SystemExit) as exc:  # Ctrl-C, or SIGTERM (exit_on_sigterm)
        print("\ninterrupted: every process this run started is stopped")
        return 130 if isinstance(exc, KeyboardInterrupt) else int(exc.code or 1)
    except Exception:
        keep = True  # the logs of fleetd, nginx and LiteLLM say what went wrong
        raise
    finally:
        if keep:
            print(f"kept {tmp} (configs and logs)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
