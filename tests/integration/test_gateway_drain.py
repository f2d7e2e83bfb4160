"""Zero-drop drain: hundreds of concurrent streams through the gateway while a replica drains."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from daemon_harness import FAST_HEALTH, Fleet, running_fleet

from fleetd.control import Caller
from fleetd.model.worker import WorkerState

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

HEALTH = "\n".join(
    f"{k} = {v}" for k, v in {**FAST_HEALTH, "drain_timeout_s": 60, "stop_grace_s": 10}.items()
)
TWO_REPLICAS = f"""
[[models]]
name = "chat"
engine = "vllm"
model = "acme/chat-1B"
vram_gib = 2.0
overhead_gib = 0.0
replicas = 2
capabilities = ["chat"]
[models.health]
{HEALTH}
"""
CONCURRENCY = 200


@dataclass
class Load:
    """What the clients saw."""

    ok: int = 0
    failures: list[str] = field(default_factory=list)
    by_worker: Counter[str] = field(default_factory=Counter)
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def one_stream(http: aiohttp.ClientSession, url: str, load: Load) -> None:
    body = {
        "model": "chat",
        "messages": [{"role": "user", "content": "stream please"}],
        "max_tokens": 16,
        "stream": True,
    }
    try:
        async with http.post(url, json=body) as resp:
            if resp.status != 200:
                load.failures.append(f"HTTP {resp.status}: {await resp.text()}")
                return
            worker = resp.headers["X-Fleetd-Worker"]
            tokens = 0
            done = False
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                if line == b"data: [DONE]":
                    done = True
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    load.failures.append(f"error event from {worker}: {event['error']}")
                    return
                tokens += 1
            if not done or tokens < 16:
                load.failures.append(f"{worker}: stream ended early ({tokens} chunks)")
                return
            load.ok += 1
            load.by_worker[worker] += 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        load.failures.append(f"{type(exc).__name__}: {exc}")


async def client_loop(http: aiohttp.ClientSession, url: str, load: Load) -> None:
    while not load.stop.is_set():
        await one_stream(http, url, load)


async def test_draining_a_replica_under_load_drops_nothing(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, TWO_REPLICAS) as fleet:
        first = await fleet.wait_state("chat#0", WorkerState.READY, timeout_s=60)
        await fleet.wait_state("chat#1", WorkerState.READY, timeout_s=60)
        gateway = fleet.daemon.gateway
        assert gateway is not None
        url = f"http://127.0.0.1:{gateway.port}/v1/chat/completions"
        load = Load()
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            clients = [
                asyncio.create_task(client_loop(http, url, load)) for _ in range(CONCURRENCY)
            ]
            await wait_for_inflight(fleet, CONCURRENCY // 2)
            before = load.ok
            in_flight_at_drain = gateway.inflight.count(f"chat#0@{first.gpu_uuid}")
            fleet.daemon.control.drain("worker", "chat#0", Caller(uid=0, pid=1))
            # the instance drains (no new requests, the running ones finish), then stops;
            # replicas of a model never share a GPU, so with two GPUs it waits, pending
            await fleet.wait_until(
                "chat#0 drained and stopped",
                lambda: all(
                    s.pid is None for s in fleet.reconciler.workers() if s.name == "chat#0"
                ),
                timeout_s=90,
            )
            during = load.ok - before
            await asyncio.sleep(1.0)  # chat#1 alone carries the load
            fleet.daemon.control.undrain("worker", "chat#0", Caller(uid=0, pid=1))
            await fleet.wait_state("chat#0", WorkerState.READY, timeout_s=60)
            back = load.ok
            await asyncio.sleep(1.0)  # and chat#0 takes its share again
            load.stop.set()
            await asyncio.gather(*clients)
        after = load.ok - back
        print(  # noqa: T201 - the figures, with -s
            f"ok={load.ok} in flight at drain={in_flight_at_drain} "
            f"during drain={during} by worker={dict(load.by_worker)}"
        )
        assert load.failures == [], f"{len(load.failures)} failures, first: {load.failures[:3]}"
        assert in_flight_at_drain > 0, "the drain started with nothing in flight: not a test"
        assert during > 0, "load did not continue through the drain"
        assert load.ok > 2 * CONCURRENCY
        assert after > 0
        assert set(load.by_worker) == {"chat#0", "chat#1"}
        drain_events = [e for e in fleet.seen if e.fields.get("new") == "draining"]
        assert drain_events, "the worker never went through draining"
        assert gateway.inflight.total() == 0


async def wait_for_inflight(fleet: Fleet, count: int) -> None:
    gateway = fleet.daemon.gateway
    assert gateway is not None
    deadline = time.monotonic() + 30
    while gateway.inflight.total() < count:
        assert time.monotonic() < deadline, f"load never reached {count} in flight"
        await asyncio.sleep(0.05)
