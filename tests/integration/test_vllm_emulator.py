"""The vLLM emulator behaves like real vLLM 0.33 as documented (real processes, official client)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import psutil
import pytest
from openai.types.chat import (
    ChatCompletionContentPartImageParam,
    ChatCompletionContentPartParam,
    ChatCompletionContentPartTextParam,
)

from fleetd.sim.common import fake_tokens
from fleetd.sim.host import ENV_SIM_DIR, SimHost

MODEL = "tiny-llama"
API_KEY = "sekret"
UTIL_MIB = math.ceil(16384 * 0.92)  # the default --gpu-memory-utilization of a 16 GiB GPU


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Emulator:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text()

    def engine_core(self) -> psutil.Process:
        children = psutil.Process(self.proc.pid).children()
        assert len(children) == 1, children
        return children[0]

    async def wait_exit(self, timeout_s: float = 10.0) -> int:
        return await asyncio.to_thread(self.proc.wait, timeout_s)

    async def wait_log(self, text: str, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.log():
            assert time.monotonic() < deadline, f"{text!r} not logged:\n{self.log()}"
            await asyncio.sleep(0.02)

    async def wait_ready(self, timeout_s: float = 15.0) -> int:
        """Poll /health until 200; returns how many attempts were refused."""
        refused = 0
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as session:
            while True:
                assert self.proc.poll() is None, f"emulator exited early:\n{self.log()}"
                assert time.monotonic() < deadline, f"not ready:\n{self.log()}"
                try:
                    async with session.get(f"{self.base}/health") as resp:
                        if resp.status == 200:
                            return refused
                except aiohttp.ClientConnectorError:
                    refused += 1
                await asyncio.sleep(0.02)


Launch = Callable[..., Emulator]


def _start(
    root: Path, log_path: Path, flags: tuple[str, ...], env: dict[str, str] | None, gpu: str
) -> Emulator:
    port = free_port()
    environ = {
        **os.environ,
        ENV_SIM_DIR: str(root),
        "CUDA_VISIBLE_DEVICES": gpu,
        "FLEETD_SIM_LOAD_S": "0.3",
        "FLEETD_SIM_TOKEN_S": "0.001",
        **(env or {}),
    }
    argv = [sys.executable, "-m", "fleetd.sim.vllm", "serve", MODEL, "--host", "127.0.0.1"]
    with log_path.open("wb") as fh:
        proc = subprocess.Popen(
            [*argv, "--port", str(port), *flags],
            env=environ,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: teardown kills the group, orphans included
        )
    return Emulator(proc, port, log_path)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # pgid == pid (start_new_session)
    proc.wait()


@pytest.fixture
def sim(tmp_path: Path) -> SimHost:
    return SimHost.create(tmp_path / "sim", [("GPU A", 16384, 0), ("GPU B", 16384, 0)])


@pytest.fixture
def launch(sim: SimHost, tmp_path: Path) -> Iterator[Launch]:
    started: list[Emulator] = []

    def start(*flags: str, env: dict[str, str] | None = None, gpu: str = "1") -> Emulator:
        emu = _start(sim.root, tmp_path / f"vllm-{len(started)}.log", flags, env, gpu)
        started.append(emu)
        return emu

    yield start
    for emu in started:
        _kill_group(emu.proc)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """One ready emulator for the read-only protocol tests (saves a start per test)."""
    root = tmp_path_factory.mktemp("shared")
    SimHost.create(root / "sim", [("GPU A", 16384, 0)])
    flags = (
        "--served-model-name", "tiny", "tiny-alias",
        "--max-model-len", "4096",
        "--api-key", API_KEY,
        "--limit-mm-per-prompt", '{"image": 2}',
    )  # fmt: skip
    emu = _start(root / "sim", root / "vllm.log", flags, None, "0")
    deadline = time.monotonic() + 15
    while True:
        try:
            with urllib.request.urlopen(f"{emu.base}/health", timeout=1):
                break
        except (urllib.error.URLError, ConnectionError):
            assert emu.proc.poll() is None, emu.log()
            assert time.monotonic() < deadline, emu.log()
            time.sleep(0.02)
    yield emu
    _kill_group(emu.proc)


@pytest.fixture
async def client(shared: Emulator) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{shared.base}/v1", api_key=API_KEY, max_retries=0
    ) as oai:
        yield oai


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


async def _sse(resp: aiohttp.ClientResponse) -> list[str]:
    return [
        line.decode().removeprefix("data: ").rstrip("\n")
        async for line in resp.content
        if line.startswith(b"data: ")
    ]


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


# -- protocol (shared server) -----------------------------------------------------------------
async def test_models_lists_one_card_per_served_name(shared: Emulator) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{shared.base}/v1/models", headers=_auth()) as resp,
    ):
        assert resp.status == 200
        body = await resp.json()
    assert body["object"] == "list"
    assert [card["id"] for card in body["data"]] == ["tiny", "tiny-alias"]
    for card in body["data"]:
        assert card["object"] == "model"
        assert card["owned_by"] == "vllm"
        assert card["root"] == MODEL
        assert card["parent"] is None
        assert card["max_model_len"] == 4096
        (perm,) = card["permission"]
        assert perm["id"].startswith("modelperm-")
        assert perm["object"] == "model_permission"


async def test_chat_without_streaming(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model="tiny-alias", messages=[{"role": "user", "content": "Hello there!"}], max_tokens=5
    )
    assert reply.id.startswith("chatcmpl-")
    assert reply.model == "tiny"  # responses use the first served name
    choice = reply.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant"
    assert choice.message.content == "".join(fake_tokens("Hello there!", 5))
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 5


async def test_chat_streaming_with_the_official_client(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "stream me"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    first, *content, usage = chunks
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == ""
    assert len(content) == 6
    assert "".join(c.choices[0].delta.content or "" for c in content) == "".join(
        fake_tokens("stream me", 6)
    )
    assert [c.choices[0].finish_reason for c in content] == [None] * 5 + ["length"]
    assert usage.choices == []
    assert usage.usage is not None
    assert usage.usage.completion_tokens == 6
    assert len({c.id for c in chunks}) == 1


async def test_raw_stream_is_sse_and_ends_with_done(shared: Emulator) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{shared.base}/v1/chat/completions", json=body, headers=_auth()) as resp,
    ):
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        events = await _sse(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"  # no max_tokens: ends by itself
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


async def test_completions(client: openai.AsyncOpenAI) -> None:
    reply = await client.completions.create(model="tiny", prompt="hello world", max_tokens=4)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == "".join(fake_tokens("hello world", 4))
    assert reply.choices[0].finish_reason == "length"
    default = await client.completions.create(model="tiny", prompt="hello world")
    assert default.usage is not None
    assert default.usage.completion_tokens == 16  # vLLM's default max_tokens for completions


async def test_image_parts_are_accepted_up_to_the_limit(client: openai.AsyncOpenAI) -> None:
    image: ChatCompletionContentPartImageParam = {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
    }
    text: ChatCompletionContentPartTextParam = {"type": "text", "text": "what is in these?"}
    two: list[ChatCompletionContentPartParam] = [text, image, image]
    reply = await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": two}], max_tokens=3
    )
    assert reply.choices[0].finish_reason == "length"
    three: list[ChatCompletionContentPartParam] = [*two, image]
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": three}]
        )
    assert err.value.status_code == 400
    assert "At most 2 image(s) may be provided in one prompt." in err.value.message


async def test_unknown_model_is_404(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        await client.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}]
        )
    assert err.value.body == {
        "message": "The model `nope` does not exist. Valid aliases: tiny, tiny-alias.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }


async def test_bad_requests_get_vllm_error_bodies(shared: Emulator) -> None:
    url = f"{shared.base}/v1/chat/completions"
    too_long = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}
    async with aiohttp.ClientSession(headers=_auth()) as session:
        async with session.post(url, json=too_long) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
        assert error["type"] == "BadRequestError"
        assert error["message"].startswith(
            "max_tokens=5000 cannot be greater than max_model_len=4096."
        )
        async with session.post(url, data=b"{not json") as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == 400


async def test_api_key_guards_only_v1_paths(shared: Emulator) -> None:
    async with aiohttp.ClientSession() as session:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            async with session.get(f"{shared.base}/v1/models", headers=headers) as resp:
                assert resp.status == 401
                assert await resp.json() == {"error": "Unauthorized"}
        async with session.get(
            f"{shared.base}/v1/models", headers={"Authorization": f"bearer {API_KEY}"}
        ) as resp:
            assert resp.status == 200  # the scheme is case-insensitive
        for path in ("/health", "/ping", "/metrics", "/version", "/load"):
            async with session.get(f"{shared.base}{path}") as resp:
                assert resp.status == 200, path
        async with session.get(f"{shared.base}/version") as resp:
            assert await resp.json() == {"version": "0.33.0"}
        async with session.post(f"{shared.base}/sleep") as resp:
            assert resp.status == 404  # no VLLM_SERVER_DEV_MODE, no --enable-sleep-mode


async def test_metrics_use_vllm_names_and_labels(
    shared: Emulator, client: openai.AsyncOpenAI
) -> None:
    await client.completions.create(model="tiny", prompt="count me", max_tokens=3)
    async with aiohttp.ClientSession() as session, session.get(f"{shared.base}/metrics") as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    labels = '{engine="0",model_name="tiny"}'
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
    ):
        assert f"{name}{labels} " in text, name
    assert "vllm:gpu_cache_usage_perc" not in text  # removed in 0.33
    assert "# TYPE vllm:e2e_request_latency_seconds histogram" in text
    assert _metric(text, "vllm:generation_tokens_total") >= 3
    assert 'finished_reason="length"} ' in text


# -- lifecycle (one emulator per test) ----------------------------------------------------------
async def test_connection_refused_while_loading_then_ready(launch: Launch) -> None:
    emu = launch(env={"FLEETD_SIM_LOAD_S": "0.6"})
    await emu.wait_log("Starting to load model")  # the engine core starts after the bind
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", emu.port)):
        pass
    with socket.socket() as other, pytest.raises(OSError, match="in use"):
        other.bind(("127.0.0.1", emu.port))  # bound (reserved) while loading, just not listening
    assert await emu.wait_ready() > 0
    log = emu.log()
    order = [
        f"Starting to load model {MODEL}...",
        "Model loading took",
        "Available KV cache memory:",
        f"Starting vLLM server on http://127.0.0.1:{emu.port}",
        "Application startup complete.",
    ]
    positions = [log.index(line) for line in order]
    assert positions == sorted(positions)


async def test_vram_is_held_by_the_engine_core_child_and_freed_on_exit(
    launch: Launch, sim: SimHost
) -> None:
    emu = launch()
    await emu.wait_ready()
    core = emu.engine_core()
    assert "VLLM::EngineCore" in core.cmdline()
    gpu1 = sim.resolve("1").uuid
    assert [(c.pid, c.uuid, c.used_mib) for c in sim.claims()] == [(core.pid, gpu1, UTIL_MIB)]
    emu.proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert await emu.wait_exit() == 0
    assert time.monotonic() - started < 1.5
    assert not core.is_running()
    assert sim.claims() == []


async def test_startup_refused_when_free_memory_is_short(launch: Launch, sim: SimHost) -> None:
    sim.claim(sim.resolve("1").uuid, 4096, pid=4_000_000, name="hog", persistent=True)
    emu = launch()
    assert await emu.wait_exit() == 1
    log = emu.log()
    assert (
        "ValueError: Free memory on device cuda:0 (12.0/16.0 GiB) on startup is less than "
        "desired GPU memory utilization (0.92, 14.72 GiB). Decrease GPU memory utilization "
        "or reduce GPU memory used by other processes."
    ) in log
    assert (
        "RuntimeError: Engine core initialization failed. See root cause above. "
        "Failed core proc(s): {'EngineCore_DP0': 1}"
    ) in log
    assert [c.name for c in sim.claims()] == ["hog"]


async def test_context_that_does_not_fit_the_kv_cache_is_refused(launch: Launch) -> None:
    env = {"FLEETD_SIM_WEIGHTS_MIB": "14000", "FLEETD_SIM_KV_KIB_PER_TOKEN": "144"}
    emu = launch("--max-model-len", "32768", env=env)
    assert await emu.wait_exit() == 1
    assert (
        "ValueError: To serve at least one request with the model's max seq len (32768), "
        "(4.50 GiB KV cache is needed, which is larger than the available KV cache memory "
        "(0.55 GiB)."
    ) in emu.log()


async def test_running_gauge_counts_a_slow_stream(launch: Launch) -> None:
    emu = launch(env={"FLEETD_SIM_TOKEN_S": "0.02"})
    await emu.wait_ready()
    body = {"messages": [{"role": "user", "content": "slow"}], "max_tokens": 30, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{emu.base}/v1/chat/completions", json=body) as stream:
            await stream.content.readline()  # the role chunk: the request is running
            async with session.get(f"{emu.base}/metrics") as resp:
                text = await resp.text()
            assert _metric(text, "vllm:num_requests_running") == 1.0
            assert 0 < _metric(text, "vllm:kv_cache_usage_perc") <= 1
            assert (await _sse(stream))[-1] == "[DONE]"
        async with session.get(f"{emu.base}/metrics") as resp:
            assert _metric(await resp.text(), "vllm:num_requests_running") == 0.0


async def _open_stream(
    session: aiohttp.ClientSession, emu: Emulator, max_tokens: int
) -> aiohttp.ClientResponse:
    body = {"messages": [{"role": "user", "content": "long"}], "max_tokens": max_tokens}
    resp = await session.post(f"{emu.base}/v1/chat/completions", json={**body, "stream": True})
    await resp.content.readline()  # role chunk
    await resp.content.readline()
    await resp.content.readline()  # first token: generation is under way
    return resp


def _sigterm(emu: Emulator, target: str) -> None:
    if target == "group":  # what a supervisor (and systemd) does: the engine core gets it too
        os.killpg(emu.proc.pid, signal.SIGTERM)
    else:
        emu.proc.send_signal(signal.SIGTERM)


@pytest.mark.parametrize("target", ["api", "group"])
async def test_sigterm_with_shutdown_timeout_drains(launch: Launch, target: str) -> None:
    emu = launch("--shutdown-timeout", "5", env={"FLEETD_SIM_TOKEN_S": "0.02"})
    await emu.wait_ready()
    async with aiohttp.ClientSession() as session:
        stream = await _open_stream(session, emu, 40)
        _sigterm(emu, target)
        await emu.wait_log("[shutdown] API server: stopping engine client mode=drain timeout=5s")
        async with session.get(f"{emu.base}/health") as resp:
            assert resp.status == 200
        body = {"messages": [{"role": "user", "content": "late"}]}
        async with session.post(f"{emu.base}/v1/chat/completions", json=body) as resp:
            assert resp.status == 500
            assert await resp.json() == {
                "error": {
                    "message": "cannot schedule new futures after shutdown",
                    "type": "InternalServerError",
                    "param": None,
                    "code": 500,
                }
            }
        async with stream:
            events = await _sse(stream)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len(chunks) == 39  # the 40 tokens minus the one read before the signal
    assert await emu.wait_exit(timeout_s=5) == 0


@pytest.mark.parametrize("target", ["api", "group"])
async def test_sigterm_by_default_aborts_in_flight_streams(launch: Launch, target: str) -> None:
    emu = launch(env={"FLEETD_SIM_TOKEN_S": "0.05"})
    await emu.wait_ready()
    async with aiohttp.ClientSession() as session:
        stream = await _open_stream(session, emu, 200)
        _sigterm(emu, target)
        started = time.monotonic()
        async with stream:
            events = await _sse(stream)
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])["choices"][0]
    assert (last["delta"], last["finish_reason"]) == ({"content": ""}, "abort")
    assert await emu.wait_exit() == 0
    assert time.monotonic() - started < 1.5


async def test_engine_core_death_turns_health_503_then_exits_0(
    launch: Launch, sim: SimHost
) -> None:
    emu = launch()
    await emu.wait_ready()
    emu.engine_core().kill()
    killed = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(f"{emu.base}/health") as resp:
                if resp.status == 503:
                    assert await resp.read() == b""
                    break
            assert time.monotonic() - killed < 2, "health never turned 503"
            await asyncio.sleep(0.02)
    assert await emu.wait_exit() == 0
    assert 2.5 < time.monotonic() - killed < 6  # vLLM's watchdog: about 3 s
    assert sim.claims() == []


async def test_sigkill_of_the_api_server_orphans_the_engine_core(
    launch: Launch, sim: SimHost
) -> None:
    emu = launch()
    await emu.wait_ready()
    core = emu.engine_core()
    emu.proc.kill()
    assert await emu.wait_exit() == -signal.SIGKILL
    _, alive = psutil.wait_procs([core], timeout=0.5)
    assert alive == [core]  # still running, still holding its memory: kill the group
    assert [c.pid for c in sim.claims()] == [core.pid]


async def test_sigusr1_hangs_the_server(launch: Launch) -> None:
    emu = launch()
    await emu.wait_ready()
    emu.proc.send_signal(signal.SIGUSR1)
    timeout = aiohttp.ClientTimeout(total=0.5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        hung = False
        for _ in range(20):  # the signal is handled within a loop turn or two
            try:
                async with session.get(f"{emu.base}/health"):
                    pass
            except TimeoutError:  # accepted, never answered (not refused)
                hung = True
                break
        assert hung
    emu.proc.send_signal(signal.SIGTERM)  # a hung server ignores it
    with pytest.raises(subprocess.TimeoutExpired):
        await emu.wait_exit(timeout_s=0.3)


@pytest.mark.parametrize("how", ["crash_after_s", "SIGUSR2"])
async def test_crash_exits_1_and_takes_the_engine_core_along(
    launch: Launch, sim: SimHost, how: str
) -> None:
    env = {"FLEETD_SIM_FAULTS": "crash_after_s=0.3"} if how == "crash_after_s" else {}
    emu = launch(env=env)
    await emu.wait_ready()
    core = emu.engine_core()
    if how == "SIGUSR2":
        emu.proc.send_signal(signal.SIGUSR2)
    assert await emu.wait_exit() == 1
    assert "EngineDeadError" in emu.log()
    assert not core.is_running()
    assert sim.claims() == []


async def test_exit_on_load_fails_start_up(launch: Launch, sim: SimHost) -> None:
    emu = launch(env={"FLEETD_SIM_FAULTS": "exit_on_load"})
    assert await emu.wait_exit() == 1
    log = emu.log()
    assert "EngineCore failed to start." in log
    assert "Traceback (most recent call last):" in log
    assert "RuntimeError: Engine core initialization failed." in log
    assert "Application startup complete." not in log
    assert sim.claims() == []


async def test_sleep_mode_frees_memory_and_queues_requests(launch: Launch, sim: SimHost) -> None:
    emu = launch(
        "--enable-sleep-mode", env={"VLLM_SERVER_DEV_MODE": "1", "FLEETD_SIM_SLEEP_S": "0.05"}
    )
    await emu.wait_ready()
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{emu.base}/sleep?level=1") as resp:
            assert resp.status == 200
        assert [c.used_mib for c in sim.claims()] == [512]
        async with session.get(f"{emu.base}/is_sleeping") as resp:
            assert await resp.json() == {"is_sleeping": True}
        body = {"messages": [{"role": "user", "content": "wake"}], "max_tokens": 2}
        request = asyncio.ensure_future(session.post(f"{emu.base}/v1/chat/completions", json=body))
        deadline = time.monotonic() + 5
        while True:  # asleep: the request waits, it is not refused
            async with session.get(f"{emu.base}/metrics") as resp:
                if _metric(await resp.text(), "vllm:num_requests_waiting") == 1.0:
                    break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert not request.done()
        async with session.post(f"{emu.base}/wake_up") as resp:
            assert resp.status == 200
        async with await request as resp:
            assert resp.status == 200
        assert [c.used_mib for c in sim.claims()] == [UTIL_MIB]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--disable-log-requests"], "unrecognized arguments: --disable-log-requests"),
        (["--gpu-memory-utilization", "1.5"], "argument --gpu-memory-utilization"),
        (["--no-such-flag", "1"], "unrecognized arguments: --no-such-flag 1"),
    ],
)
def test_rejected_flags_exit_2_like_argparse(flags: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fleetd.sim.vllm", "serve", MODEL, *flags],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "usage: vllm serve [model_tag] [options]" in done.stderr
    assert message in done.stderr


def test_missing_simulated_host_exits_1(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != ENV_SIM_DIR}
    done = subprocess.run(
        [sys.executable, "-m", "fleetd.sim.vllm", "serve", MODEL, "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert done.returncode == 1
    assert "FLEETD_SIM_DIR" in done.stdout
