"""The Ollama emulator as real processes, driven by the official ``ollama`` and ``openai`` clients.

Each test starts ``python -m fleetd.sim.ollama serve`` in its own session (a process group its
runners join) against a simulated host with two 16 GiB GPUs, waits for ``GET /`` and checks what
a supervisor would: API answers, /api/ps, and which pid holds VRAM on which simulated GPU.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import ollama
import openai
import psutil
import pytest

from fleetd.sim import ollama_env
from fleetd.sim.host import ENV_SIM_DIR, Claim, SimHost

DEADLINE_S = 10.0
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


@dataclass
class Serve:
    """One running emulator and the clients pointed at it."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    client: ollama.AsyncClient
    http: httpx.AsyncClient

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def runners(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.NoSuchProcess):
            return [
                p
                for p in psutil.Process(self.proc.pid).children()
                if "runner" in p.cmdline() and p.status() != psutil.STATUS_ZOMBIE
            ]
        return []


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``check`` until it holds or the deadline passes (observing, never sleeping blind)."""
    deadline = time.monotonic() + DEADLINE_S
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def all_dead(procs: list[psutil.Process]) -> None:
    """Wait until every process is gone or a zombie (orphans are reaped late by init)."""

    def dead(proc: psutil.Process) -> bool:
        try:
            return proc.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    async def check() -> bool:
        return all(dead(p) for p in procs)

    await eventually(check, f"processes {[p.pid for p in procs]} to die")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def sim(tmp_path: Path) -> SimHost:
    return SimHost.create(tmp_path / "sim", [("GPU A", 16384, 0), ("GPU B", 16384, 0)])


Start = Callable[..., Awaitable[Serve]]


@pytest.fixture
async def start(sim: SimHost, tmp_path: Path) -> AsyncIterator[Start]:
    started: list[Serve] = []

    async def run(gpu: str = "1", timeout_s: float | None = None, **env: str) -> Serve:
        port = free_port()
        log = tmp_path / f"ollama-{port}.log"
        inherited = {  # the caller's own Ollama/simulation settings must not leak in
            k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "FLEETD_SIM_"))
        }
        full_env = {
            **inherited,
            ENV_SIM_DIR: str(sim.root),
            "CUDA_VISIBLE_DEVICES": gpu,
            "OLLAMA_HOST": f"127.0.0.1:{port}",
            "FLEETD_SIM_LOAD_S": "0.2",
            "FLEETD_SIM_TOKEN_S": "0.005",
            **env,
        }
        with log.open("wb") as sink:
            proc = await asyncio.to_thread(
                subprocess.Popen,
                [sys.executable, "-m", "fleetd.sim.ollama", "serve"],
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=sink,
                start_new_session=True,
            )
        url = f"http://127.0.0.1:{port}"
        serve = Serve(
            proc, url, log, ollama.AsyncClient(host=url, timeout=timeout_s), httpx.AsyncClient()
        )
        started.append(serve)

        async def answers() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"emulator exited {proc.returncode}:\n{serve.log_text()}")
            try:
                response = await serve.http.get(f"{url}/")
            except httpx.TransportError:
                return False
            return response.status_code == 200 and response.text == "Ollama is running"

        await eventually(answers, "GET / to answer")
        return serve

    yield run
    for serve in started:
        await serve.client.close()  # type: ignore[no-untyped-call]
        await serve.http.aclose()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(serve.proc.pid, signal.SIGKILL)  # serve and its runners: one group
        serve.proc.wait()


def claims_on(sim: SimHost, gpu_index: int) -> list[Claim]:
    uuid = sim.gpus()[gpu_index].uuid
    return [c for c in sim.claims() if c.uuid == uuid]


async def loaded(serve: Serve) -> dict[str, ollama.ProcessResponse.Model]:
    return {str(m.model): m for m in (await serve.client.ps()).models}


async def test_answers_version_tags_and_empty_ps(start: Start) -> None:
    serve = await start(FLEETD_SIM_OLLAMA_MODELS='[{"name": "tiny", "size_bytes": 100000000}]')
    head = await serve.http.head(f"{serve.url}/")
    assert (head.status_code, head.content) == (200, b"")
    version = await serve.http.get(f"{serve.url}/api/version")
    assert version.json() == {"version": "0.33.0"}
    tags = {m.model: m for m in (await serve.client.list()).models}
    library = {"deepcoder:14b", "qwen2.5vl:3b", "qwen2.5vl:7b", "deepseek-r1:32b", "mixtral:8x22b"}
    assert {*library, "llama3.2:3b", "nomic-embed-text:latest"} <= set(tags)
    assert tags["llama3.2:3b"].size == 2_019_393_189
    assert tags["llama3.2:3b"].details is not None
    assert tags["llama3.2:3b"].details.quantization_level == "Q4_K_M"
    assert tags["tiny:latest"].size == 100_000_000  # FLEETD_SIM_OLLAMA_MODELS extends the library
    assert (await serve.client.ps()).models == []
    assert "Listening on 127.0.0.1:" in serve.log_text()
    assert "(version 0.33.0)" in serve.log_text()
    async with openai.AsyncOpenAI(base_url=f"{serve.url}/v1", api_key="ollama") as oai:
        models = {m.id: m.owned_by async for m in oai.models.list()}
    assert models["deepcoder:14b"] == "library"


async def test_preload_pins_the_model_in_a_runner_child_and_unload_frees_it(
    start: Start, sim: SimHost
) -> None:
    serve = await start(gpu="1")
    done = await serve.client.generate(model="llama3.2:3b", prompt="", keep_alive=-1)
    assert (done.done, done.done_reason) == (True, "load")
    ps = await loaded(serve)
    model = ps["llama3.2:3b"]
    assert model.size is not None
    assert model.size > 2_019_393_189  # weights plus KV cache and graph
    assert model.size_vram == model.size  # fully on the GPU
    assert model.context_length == 4096  # 16 GiB card: the small default context
    assert model.expires_at is not None
    assert model.expires_at > datetime.now(UTC) + timedelta(days=365 * 290)
    [claim] = claims_on(sim, 1)
    assert claims_on(sim, 0) == []
    runner = psutil.Process(claim.pid)
    assert claim.pid != serve.proc.pid
    assert runner.ppid() == serve.proc.pid
    assert "runner" in runner.cmdline()
    assert os.getpgid(claim.pid) == serve.proc.pid  # same group as serve (no Setpgid)
    assert claim.used_mib * 1024 * 1024 >= model.size_vram

    gone = await serve.client.generate(model="llama3.2:3b", prompt="", keep_alive=0)
    assert gone.done_reason == "unload"

    async def freed() -> bool:
        return not await loaded(serve) and not claims_on(sim, 1)

    await eventually(freed, "the model to leave /api/ps and its runner's VRAM to be freed")
    assert not psutil.pid_exists(claim.pid) or runner.status() == psutil.STATUS_ZOMBIE


async def test_generate_and_chat_stream_by_default_and_not_when_asked(start: Start) -> None:
    serve = await start()
    parts = [p async for p in await serve.client.generate("llama3.2:3b", "hi", stream=True)]
    assert all(not p.done for p in parts[:-1])
    assert len(parts) > 2
    final = parts[-1]
    assert (final.done, final.done_reason) == (True, "stop")
    assert final.eval_count == len(parts) - 1
    assert final.context
    assert final.total_duration is not None
    assert final.eval_duration is not None
    assert final.total_duration >= final.eval_duration > 0
    short = await serve.client.generate("llama3.2:3b", "hi", options={"num_predict": 5})
    assert (short.done_reason, short.eval_count) == ("length", 5)
    assert len(str(short.response).split()) == 5

    messages = [{"role": "user", "content": "hello"}]
    chunks = [c async for c in await serve.client.chat("llama3.2:3b", messages, stream=True)]
    text = "".join(c.message.content or "" for c in chunks)
    whole = await serve.client.chat("llama3.2:3b", messages)
    assert whole.message.content == text  # same prompt, same fake reply
    assert (whole.done_reason, chunks[-1].done_reason) == ("stop", "stop")
    raw = await serve.http.post(f"{serve.url}/api/chat", json={"model": "llama3.2", "messages": []})
    assert raw.headers["content-type"].startswith("application/json")
    assert raw.json()["done_reason"] == "load"
    streamed = await serve.http.post(
        f"{serve.url}/api/generate", json={"model": "llama3.2:3b", "prompt": "x"}
    )
    assert streamed.headers["content-type"] == "application/x-ndjson"


async def test_openai_compatible_chat_completions_and_embeddings(start: Start) -> None:
    serve = await start()
    async with openai.AsyncOpenAI(base_url=f"{serve.url}/v1", api_key="ollama") as oai:
        reply = await oai.chat.completions.create(
            model="llama3.2:3b", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage is not None
        assert reply.usage.completion_tokens == 4
        stream = await oai.chat.completions.create(
            model="llama3.2:3b", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        deltas = [chunk async for chunk in stream]
        assert deltas[-1].choices[0].finish_reason == "stop"
        assert "".join(c.choices[0].delta.content or "" for c in deltas).strip()
        completion = await oai.completions.create(model="llama3.2:3b", prompt="hi", max_tokens=3)
        assert len(completion.choices[0].text.split()) == 3
        vectors = await oai.embeddings.create(model="nomic-embed-text", input=["a", "b"])
        assert [len(d.embedding) for d in vectors.data] == [768, 768]
        with pytest.raises(openai.NotFoundError):
            await oai.chat.completions.create(model="nope", messages=[])


async def test_partial_offload_when_larger_than_the_card_and_num_gpu_zero(
    start: Start, sim: SimHost
) -> None:
    serve = await start(gpu="0")
    await serve.client.generate("mixtral:8x22b", "", keep_alive=-1)
    mixtral = (await loaded(serve))["mixtral:8x22b"]
    assert mixtral.size is not None
    assert mixtral.size_vram is not None
    assert 0 < mixtral.size_vram < mixtral.size
    assert mixtral.size > 79_509_470_182
    [claim] = claims_on(sim, 0)
    layer_mib = 1400  # mixtral:8x22b: ~80 GB over 56 layers
    assert 16384 - 457 - layer_mib < claim.used_mib <= 16384 - 457  # whole layers fill the card

    await serve.client.generate("llama3.2:3b", "", keep_alive=-1, options={"num_gpu": 0})
    cpu = (await loaded(serve))["llama3.2:3b"]
    assert cpu.size_vram == 0
    assert cpu.size is not None
    assert cpu.size > 0
    assert [c.pid for c in claims_on(sim, 0)] == [claim.pid]  # the CPU runner claims nothing


async def test_refusals_unknown_model_bad_json_images_and_capabilities(start: Start) -> None:
    serve = await start()
    with pytest.raises(ollama.ResponseError) as missing:
        await serve.client.generate("nope:7b", "hi")
    assert (missing.value.status_code, missing.value.error) == (404, "model 'nope:7b' not found")
    bad = await serve.http.post(f"{serve.url}/api/generate", content=b"{not json")
    assert bad.status_code == 400
    assert "error" in bad.json()
    with pytest.raises(ollama.ResponseError) as blind:
        await serve.client.generate("llama3.2:3b", "what is this?", images=[PNG])
    assert blind.value.status_code == 400
    assert "image input" in blind.value.error
    seen = await serve.client.chat(
        "qwen2.5vl:3b", [{"role": "user", "content": "what is this?", "images": [PNG]}]
    )
    assert seen.done_reason == "stop"
    with pytest.raises(ollama.ResponseError) as no_embed:
        await serve.client.embed("llama3.2:3b", "text")
    assert no_embed.value.status_code == 400
    with pytest.raises(ollama.ResponseError) as no_chat:
        await serve.client.chat("nomic-embed-text", [{"role": "user", "content": "hi"}])
    assert no_chat.value.error == '"nomic-embed-text" does not support chat'
    vectors = await serve.client.embed("nomic-embed-text", ["a", "b"])
    assert len(vectors.embeddings) == 2


async def test_eviction_at_max_loaded_models_takes_the_shortest_keep_alive(
    start: Start, sim: SimHost
) -> None:
    serve = await start(OLLAMA_MAX_LOADED_MODELS="2")
    await serve.client.generate("llama3.2:3b", "", keep_alive="10m")
    [llama] = claims_on(sim, 1)
    await serve.client.generate("qwen2.5vl:3b", "", keep_alive=-1)
    await serve.client.embed("nomic-embed-text", "", keep_alive=-1)  # how embedders preload
    assert set(await loaded(serve)) == {"qwen2.5vl:3b", "nomic-embed-text:latest"}

    async def llama_gone() -> bool:
        return llama.pid not in {c.pid for c in claims_on(sim, 1)}

    await eventually(llama_gone, "the evicted runner's VRAM to be freed")
    assert len(claims_on(sim, 1)) == 2


async def test_keep_alive_expiry_unloads_the_model(start: Start, sim: SimHost) -> None:
    serve = await start()
    await serve.client.generate("llama3.2:3b", "hi", keep_alive="1s")
    model = (await loaded(serve))["llama3.2:3b"]
    assert model.expires_at is not None
    assert model.expires_at < datetime.now(UTC) + timedelta(seconds=2)

    async def expired() -> bool:
        return not await loaded(serve) and not claims_on(sim, 1)

    await eventually(expired, "keep_alive 1s to unload the model")


async def test_sigterm_cuts_an_inflight_stream_and_kills_every_runner(start: Start) -> None:
    serve = await start()
    await serve.client.generate("qwen2.5vl:3b", "", keep_alive=-1)
    stream = await serve.client.generate(
        "llama3.2:3b", "long story", stream=True, options={"num_predict": 5000}
    )
    first = await anext(stream)
    assert not first.done
    runners = serve.runners()
    assert len(runners) == 2
    serve.proc.send_signal(signal.SIGTERM)
    with pytest.raises(httpx.TransportError):
        async for _ in stream:
            pass
    assert await asyncio.to_thread(serve.proc.wait, DEADLINE_S) == 0
    await all_dead(runners)


@pytest.mark.parametrize("how", ["sigkill", "sigusr2", "crash_after_s"])
async def test_a_dead_serve_leaves_its_runners_in_its_process_group(
    start: Start, sim: SimHost, how: str
) -> None:
    faults = {"FLEETD_SIM_FAULTS": "crash_after_s=2.5"} if how == "crash_after_s" else {}
    serve = await start(**faults)
    await serve.client.generate("llama3.2:3b", "", keep_alive=-1)
    [runner] = serve.runners()
    if how != "crash_after_s":
        serve.proc.send_signal(signal.SIGKILL if how == "sigkill" else signal.SIGUSR2)
    code = await asyncio.to_thread(serve.proc.wait, DEADLINE_S)
    assert code == (-signal.SIGKILL if how == "sigkill" else 1)
    assert runner.is_running()
    assert os.getpgid(runner.pid) == serve.proc.pid
    assert [c.pid for c in claims_on(sim, 1)] == [runner.pid]  # its VRAM is still held
    os.killpg(serve.proc.pid, signal.SIGKILL)  # what a supervisor must do
    await all_dead([runner])
    assert claims_on(sim, 1) == []


async def test_sigusr1_hangs_the_server_and_sigterm_still_stops_it(start: Start) -> None:
    serve = await start(timeout_s=0.5)
    serve.proc.send_signal(signal.SIGUSR1)

    async def hung() -> bool:
        try:
            await serve.client.ps()
        except httpx.ReadTimeout:
            return True
        return False

    await eventually(hung, "the server to stop answering")
    serve.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(serve.proc.wait, DEADLINE_S) == 0


async def test_exit_on_load_fails_the_request_like_a_dead_llama_server(
    start: Start, sim: SimHost
) -> None:
    serve = await start(FLEETD_SIM_FAULTS="exit_on_load")
    with pytest.raises(ollama.ResponseError) as failed:
        await serve.client.generate("llama3.2:3b", "", keep_alive=-1)
    assert failed.value.status_code == 500
    assert failed.value.error.startswith(
        "llama-server process has terminated: exit status 1: error loading model"
    )

    async def cleaned() -> bool:
        return not await loaded(serve) and not claims_on(sim, 1) and not serve.runners()

    await eventually(cleaned, "the failed runner to be gone")
    assert (await serve.http.get(f"{serve.url}/")).status_code == 200  # serve itself lives on


async def test_invalid_cuda_visible_devices_means_cpu_only(start: Start, sim: SimHost) -> None:
    serve = await start(gpu="-1")
    await serve.client.generate("deepcoder:14b", "", keep_alive=-1)
    model = (await loaded(serve))["deepcoder:14b"]
    assert model.size_vram == 0
    assert model.size is not None
    assert model.size > 8_988_111_436
    assert sim.claims() == []


async def test_requests_past_max_queue_get_503(start: Start) -> None:
    serve = await start(OLLAMA_MAX_QUEUE="1")
    holder = await serve.client.generate(
        "llama3.2:3b", "hold", stream=True, options={"num_predict": 5000}
    )
    await anext(holder)  # the only parallel slot (OLLAMA_NUM_PARALLEL=1) is taken
    body = {"model": "llama3.2:3b", "prompt": "a", "stream": False, "options": {"num_predict": 1}}
    waiting = [
        asyncio.create_task(serve.http.post(f"{serve.url}/api/generate", json=body))
        for _ in range(2)
    ]
    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    refused = done.pop().result()
    assert refused.status_code == 503
    assert refused.json() == {
        "error": "server busy, please try again.  maximum pending requests exceeded"
    }
    await holder.aclose()  # type: ignore[attr-defined]
    served = [(await task).status_code for task in waiting]
    assert sorted(served) == [200, 503]


async def test_leak_fault_grows_the_runners_claim_while_api_ps_keeps_the_prediction(
    start: Start, sim: SimHost
) -> None:
    serve = await start(FLEETD_SIM_FAULTS="leak_mib_per_s=400")
    await serve.client.generate("llama3.2:3b", "", keep_alive=-1)
    predicted = (await loaded(serve))["llama3.2:3b"].size_vram
    [first] = claims_on(sim, 1)

    async def grown() -> bool:
        return any(c.used_mib >= first.used_mib + 200 for c in claims_on(sim, 1))

    await eventually(grown, "the leaking runner's claim to grow")
    assert (await loaded(serve))["llama3.2:3b"].size_vram == predicted


async def test_unknown_routes_answer_like_gin(start: Start) -> None:
    serve = await start()
    response = await serve.http.get(f"{serve.url}/api/nothing")
    assert (response.status_code, response.text) == (404, "404 page not found")


# -- pure parsing, as envconfig and api.Duration do it (no processes) -----------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", ("http", "127.0.0.1", 11434)),
        ("0.0.0.0", ("http", "0.0.0.0", 11434)),
        ("127.0.0.1:18200", ("http", "127.0.0.1", 18200)),
        ("http://example.com", ("http", "example.com", 80)),
        ("https://example.com", ("https", "example.com", 443)),
        ("http://[::1]:9000/path", ("http", "::1", 9000)),
        ("localhost:bad", ("http", "localhost", 11434)),
    ],
)
def test_ollama_host_parsing(raw: str, expected: tuple[str, str, int]) -> None:
    assert ollama_env.parse_host(raw) == expected


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(-1, math.inf), ("-1m", math.inf), (0, 0.0), ("0", 0.0), (90, 90.0), ("1h30m", 5400.0),
     ("1.5s", 1.5), ("300ms", 0.3)],
)  # fmt: skip
def test_keep_alive_values(value: float | str, seconds: float) -> None:
    assert ollama_env.keep_alive_from_json(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["300", "5 m", "abc", True])
def test_keep_alive_values_go_rejects(value: object) -> None:
    with pytest.raises(ollama_env.DurationError):
        ollama_env.keep_alive_from_json(value)


def test_environment_keep_alive_accepts_integer_seconds_and_negative_means_forever() -> None:
    env = ollama_env.OllamaEnv.from_env
    assert env({"OLLAMA_KEEP_ALIVE": "300"}).keep_alive_s == 300.0
    assert env({"OLLAMA_KEEP_ALIVE": "24h"}).keep_alive_s == 86400.0
    assert env({"OLLAMA_KEEP_ALIVE": "-1"}).keep_alive_s == math.inf
    assert env({}).keep_alive_s == 300.0
    bad = env({"OLLAMA_NUM_PARALLEL": "many"})
    assert bad.num_parallel == 1
    assert "invalid environment variable, using default" in bad.warnings[0]
