"""The gateway with the official openai and ollama clients, on a real daemon and emulators."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import ollama
import openai
import pytest
from daemon_harness import Fleet, fleet_toml, running_fleet

from fleetd import config
from fleetd.control import Caller
from fleetd.daemon import run_daemon
from fleetd.model.worker import WorkerState
from fleetd.sim.gpu import SimulatedGpuBackend
from fleetd.sim.host import SimHost

pytestmark = pytest.mark.timeout(180)

MIXED = """
[[models]]
name = "mimo-vl"
engine = "vllm"
model = "acme/vision-4B"
served_name = "mimo"
aliases = ["vision-primary"]
vram_gib = 4.0
overhead_gib = 0.0
priority = 100
preferred_gpus = [0]
capabilities = ["vision", "chat", "reasoning"]
fallbacks = ["qwen2.5vl:3b"]
[models.health]
HEALTH

[[models]]
name = "deepcoder:14b"
engine = "ollama"
model = "deepcoder:14b"
vram_gib = 9.0
overhead_gib = 0.5
priority = 50
capabilities = ["code", "chat"]
[models.health]
HEALTH

[[models]]
name = "qwen2.5vl:3b"
engine = "ollama"
model = "qwen2.5vl:3b"
vram_gib = 3.2
overhead_gib = 0.5
priority = 40
capabilities = ["vision", "chat"]
[models.health]
HEALTH

[[models]]
name = "embed"
engine = "ollama"
model = "nomic-embed-text"
vram_gib = 0.5
priority = 5
capabilities = ["embeddings"]
[models.health]
HEALTH
"""

TWO_REPLICAS = """
[[models]]
name = "chat"
engine = "vllm"
model = "acme/chat-1B"
vram_gib = 2.0
overhead_gib = 0.0
replicas = 2
capabilities = ["chat"]
[models.health]
HEALTH
"""

PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()
OPERATOR = Caller(uid=0, pid=1)


def base_url(fleet: Fleet) -> str:
    assert fleet.daemon.gateway is not None
    return f"http://127.0.0.1:{fleet.daemon.gateway.port}"


CLIENTS: list[openai.AsyncOpenAI | ollama.AsyncClient] = []


def oai(fleet: Fleet, key: str = "unused") -> openai.AsyncOpenAI:
    client = openai.AsyncOpenAI(base_url=base_url(fleet) + "/v1", api_key=key, max_retries=0)
    CLIENTS.append(client)
    return client


def oll_client(fleet: Fleet) -> ollama.AsyncClient:
    client = ollama.AsyncClient(host=base_url(fleet))
    CLIENTS.append(client)
    return client


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while CLIENTS:
        client = CLIENTS.pop()
        await client.close()


async def all_ready(fleet: Fleet, *names: str) -> None:
    for name in names:
        await fleet.wait_state(name, WorkerState.READY, timeout_s=60)


async def test_openai_and_ollama_clients_route_through_the_fleet(tmp_path: Path) -> None:  # noqa: PLR0915 - one fleet, the whole client surface
    async with running_fleet(tmp_path, MIXED) as fleet:
        await all_ready(fleet, "mimo-vl", "deepcoder:14b", "qwen2.5vl:3b", "embed")
        client = oai(fleet)

        listed = [m.id for m in (await client.models.list()).data]
        assert listed[0] == "auto"
        assert {"mimo-vl", "mimo", "vision-primary", "deepcoder:14b", "embed"} <= set(listed)

        # by name, by served name, by alias: all to the vLLM worker, model rewritten upstream
        for name in ("mimo-vl", "mimo", "vision-primary"):
            raw = await client.chat.completions.with_raw_response.create(
                model=name, messages=[{"role": "user", "content": "hello"}], max_tokens=4
            )
            reply = raw.parse()
            assert raw.headers["x-fleetd-worker"] == "mimo-vl"
            assert reply.model == "mimo"  # what vLLM calls it
            assert reply.choices[0].message.content

        # streaming: chunks arrive one by one and end with a finish reason
        stream = await client.chat.completions.create(
            model="mimo-vl",
            messages=[{"role": "user", "content": "count"}],
            max_tokens=12,
            stream=True,
        )
        chunks = [c async for c in stream]
        assert len(chunks) >= 12
        assert chunks[-1].choices[0].finish_reason == "length"

        # auto: image parts -> the vision model; task header / prompt -> the coder
        raw = await client.chat.completions.with_raw_response.create(
            model="auto",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is in this picture?"},
                        {"type": "image_url", "image_url": {"url": PNG}},
                    ],
                }
            ],
            max_tokens=4,
        )
        assert raw.headers["x-fleetd-model"] == "mimo-vl"
        assert "vision" in raw.headers["x-fleetd-route"]
        raw = await client.chat.completions.with_raw_response.create(
            model="auto",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=4,
            extra_headers={"X-Fleetd-Task": "code"},
        )
        assert raw.headers["x-fleetd-model"] == "deepcoder:14b"
        coder = raw.parse()
        assert coder.model == "deepcoder:14b"
        completion = await client.completions.with_raw_response.create(
            model="auto", prompt="def fib(n): # finish this python function", max_tokens=4
        )
        assert completion.headers["x-fleetd-model"] == "deepcoder:14b"

        # embeddings: routed to the embedding model, refused for a chat model
        emb = await client.embeddings.create(model="embed", input=["a", "b"])
        assert len(emb.data) == 2
        assert len(emb.data[0].embedding) > 0
        with pytest.raises(openai.BadRequestError, match="does not serve embeddings"):
            await client.embeddings.create(model="mimo-vl", input="a")

        # errors in OpenAI's shape, naming what was wrong
        with pytest.raises(openai.NotFoundError, match="not served by this fleet; known: auto"):
            await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "x"}]
            )
        with pytest.raises(openai.BadRequestError, match="cannot take images"):
            await client.chat.completions.create(
                model="deepcoder:14b",
                messages=[
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG}}]}
                ],
            )
        async with aiohttp.ClientSession() as http:
            for body, code in ((b"{not json", "invalid_json"), (b"{}", "model_required")):
                async with http.post(base_url(fleet) + "/v1/chat/completions", data=body) as resp:
                    assert resp.status == 400
                    assert (await resp.json())["error"]["code"] == code
            async with http.get(base_url(fleet) + "/v2/nothing") as resp:
                assert resp.status == 404
                assert "not a gateway endpoint" in (await resp.json())["error"]["message"]

        # the Ollama client, unchanged, against the same port
        oll = oll_client(fleet)
        tags = await oll.list()
        assert {m.model for m in tags.models} == {"deepcoder:14b", "qwen2.5vl:3b", "embed"}
        answer = await oll.chat(model="deepcoder:14b", messages=[{"role": "user", "content": "hi"}])
        assert answer.message.content
        parts = [
            p async for p in await oll.generate(model="qwen2.5vl:3b", prompt="hi", stream=True)
        ]
        assert parts[-1].done
        assert len(parts) > 2
        image = base64.b64encode(b"img").decode()
        vision = await oll.chat(
            model="auto",
            messages=[{"role": "user", "content": "what is it?", "images": [image]}],
        )
        assert vision.message.content
        vectors = await oll.embed(model="embed", input="hello")
        assert len(vectors.embeddings) == 1
        with pytest.raises(ollama.ResponseError, match="runs on vLLM"):
            await oll.chat(model="mimo-vl", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(ollama.ResponseError, match="not served by this fleet"):
            await oll.chat(model="nope", messages=[{"role": "user", "content": "hi"}])

        # fallback: MiMo drained away -> its fallback serves, and the response says so
        fleet.daemon.control.drain("model", "mimo-vl", OPERATOR)
        await fleet.wait_until(
            "mimo-vl gone", lambda: all(s.name != "mimo-vl" or s.state is WorkerState.STOPPED
                                         for s in fleet.reconciler.workers())
        )  # fmt: skip
        raw = await client.chat.completions.with_raw_response.create(
            model="mimo-vl",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "describe"},
                        {"type": "image_url", "image_url": {"url": PNG}},
                    ],
                }
            ],
            max_tokens=4,
        )
        assert raw.headers["x-fleetd-fallback"] == "mimo-vl->qwen2.5vl:3b"
        assert raw.parse().model == "qwen2.5vl:3b"
        fleet.daemon.control.undrain("model", "mimo-vl", OPERATOR)
        await all_ready(fleet, "mimo-vl")
        raw = await client.chat.completions.with_raw_response.create(
            model="mimo-vl", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
        assert "x-fleetd-fallback" not in raw.headers

        # the same story in Prometheus
        async with aiohttp.ClientSession() as http, http.get(fleet.daemon.metrics_url) as resp:
            scraped = await resp.text()
        assert 'fleetd_gateway_responses_total{code="200"}' in scraped
        assert 'fleetd_gateway_responses_total{code="404"} 2.0' in scraped  # openai, ollama
        assert 'fleetd_gateway_problems_total{kind="fallback"} 1.0' in scraped
        assert "fleetd_gateway_in_flight 0.0" in scraped


async def test_api_keys_and_size_limit(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# lab keys\nsecret-1\n\nsecret-2\n")
    gateway = f'api_keys_file = "{keys}"\nmax_request_mib = 0.01'
    models = TWO_REPLICAS.replace("replicas = 2", "replicas = 1")
    async with running_fleet(tmp_path / "f", models, gateway=gateway) as fleet:
        await all_ready(fleet, "chat")
        with pytest.raises(openai.AuthenticationError, match="API key"):
            await oai(fleet, "wrong").chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "x"}]
            )
        with pytest.raises(openai.AuthenticationError):
            await oai(fleet, "wrong").models.list()
        ok = await oai(fleet, "secret-2").chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
        assert ok.choices[0].message.content
        with pytest.raises(openai.APIStatusError, match="max_request_mib") as big:
            await oai(fleet, "secret-1").chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "x" * 20000}]
            )
        assert big.value.status_code == 413
        oll = oll_client(fleet)
        with pytest.raises(ollama.ResponseError, match="API key"):
            await oll.list()


async def test_retry_before_first_byte_and_what_a_kill_mid_stream_looks_like(
    tmp_path: Path,
) -> None:
    async with running_fleet(tmp_path, TWO_REPLICAS) as fleet:
        await all_ready(fleet, "chat#0", "chat#1")
        gw = fleet.daemon.gateway
        assert gw is not None
        client = oai(fleet)

        # a non-streaming request whose engine dies mid-generation is retried elsewhere:
        # nothing had reached the client, so it sees one ordinary answer
        slow = asyncio.ensure_future(
            client.chat.completions.with_raw_response.create(
                model="chat", messages=[{"role": "user", "content": "long"}], max_tokens=400
            )
        )
        await fleet.wait_until("request in flight", lambda: gw.inflight.total() == 1)
        victim = next(iter(gw.inflight.snapshot())).split("@")[0]
        pid = fleet.status(victim).pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        raw = await slow
        assert raw.headers["x-fleetd-worker"] != victim
        assert raw.parse().choices[0].finish_reason == "length"
        assert gw.stats.retries >= 1
        await fleet.wait_state(victim, WorkerState.READY, timeout_s=60)

        # a stream that already sent tokens cannot be replayed: the client gets the tokens so
        # far, then an error event in OpenAI's shape, which the openai client raises
        stream = await client.chat.completions.create(
            model="chat",
            messages=[{"role": "user", "content": "long"}],
            max_tokens=2000,
            stream=True,
        )
        received = 0
        with pytest.raises(openai.APIError, match="stopped mid-stream") as lost:  # noqa: PT012 - raised while iterating
            async for _chunk in stream:
                received += 1
                if received == 3:
                    victim = next(iter(gw.inflight.snapshot())).split("@")[0]
                    pid = fleet.status(victim).pid
                    assert pid is not None
                    os.kill(pid, signal.SIGKILL)
        assert received >= 3
        assert "retry the request" in str(lost.value)
        assert gw.stats.mid_stream_failures == 1
        # and the next request goes to the surviving replica at once
        again = await client.chat.completions.with_raw_response.create(
            model="chat", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
        assert again.headers["x-fleetd-worker"] != victim


async def test_client_disconnect_cancels_the_upstream_request(tmp_path: Path) -> None:
    models = TWO_REPLICAS.replace("replicas = 2", "replicas = 1")
    async with running_fleet(tmp_path, models) as fleet:
        status = await fleet.wait_state("chat", WorkerState.READY)
        gw = fleet.daemon.gateway
        assert gw is not None
        engine_metrics = f"http://127.0.0.1:{status.port}/metrics"
        async with aiohttp.ClientSession() as http:
            body = {
                "model": "chat",
                "messages": [{"role": "user", "content": "go on forever"}],
                "max_tokens": 2000,
                "stream": True,
            }
            async with http.post(base_url(fleet) + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
                await resp.content.readline()
                assert await running(http, engine_metrics) == 1
            # leaving the block closed the connection mid-stream
            await fleet.wait_until("gateway forgot it", lambda: gw.inflight.total() == 0)
            for _ in range(50):
                if await running(http, engine_metrics) == 0:
                    break
                await asyncio.sleep(0.1)
            assert await running(http, engine_metrics) == 0, "the engine still generates"


async def running(http: aiohttp.ClientSession, url: str) -> float:
    async with http.get(url) as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith("vllm:num_requests_running{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no vllm:num_requests_running in /metrics")


async def test_gateway_port_taken_is_a_clear_start_failure(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        path = tmp_path / "fleetd.toml"
        models = TWO_REPLICAS.replace("replicas = 2", "replicas = 1")
        path.write_text(fleet_toml(tmp_path, models, gateway=f"port = {port}"))
        cfg = config.load_config(path)
        host = SimHost.create(tmp_path / "sim", [("sim", 16384, 0)])
        code = await run_daemon(cfg, backend=SimulatedGpuBackend(host), install_signals=False)
        assert code == 1
        out = capfd.readouterr()
        assert f"gateway cannot listen on 127.0.0.1:{port}" in out.out + out.err
        assert "change [gateway] port" in out.out + out.err


EMBED_WITHOUT_CAPABILITY = """
[[models]]
name = "embed"
engine = "ollama"
model = "nomic-embed-text"
vram_gib = 0.5
[models.health]
HEALTH
"""


async def test_a_model_that_cannot_load_backs_off_then_fails_with_a_hint(tmp_path: Path) -> None:
    # an embedding model not declared as one: Ollama refuses the /api/generate that loads it
    async with running_fleet(tmp_path, EMBED_WITHOUT_CAPABILITY) as fleet:
        failed = await fleet.wait_state("embed", WorkerState.FAILED, timeout_s=30)
        assert "add 'embeddings' to its capabilities" in failed.reason
        assert "fleetctl restart embed" in failed.reason
        attempts = fleet.kinds("embed").count("worker.state_changed:starting")
        # max_restarts = 4: five tries, spaced by a growing backoff (not a tight loop)
        assert attempts == 5
        backoffs = [
            e.fields.get("reason", "")
            for e in fleet.seen
            if e.fields.get("worker") == "embed" and e.fields.get("new") == "backoff"
        ]
        assert [b.rsplit("retry in ", 1)[1] for b in backoffs] == [
            "0.2 s",
            "0.4 s",
            "0.8 s",
            "1.0 s",
        ]
