"""The daemon supervises real emulated engines: start, crash, hang, crash loop, shutdown."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psutil
import pytest
from daemon_harness import gpu_claims, running_fleet

from fleetd.model.worker import WorkerState

pytestmark = pytest.mark.timeout(120)

VLLM_AND_OLLAMA = """
[[models]]
name = "mimo-vl"
engine = "vllm"
model = "acme/vision-4B"
vram_gib = 10.0
overhead_gib = 2.0
priority = 100
preferred_gpus = [0]
[models.health]
HEALTH

[[models]]
name = "deepcoder:14b"
engine = "ollama"
model = "deepcoder:14b"
vram_gib = 9.0
overhead_gib = 0.5
priority = 50
[models.health]
HEALTH

[[models]]
name = "qwen2.5vl:3b"
engine = "ollama"
model = "qwen2.5vl:3b"
vram_gib = 3.2
overhead_gib = 0.5
priority = 40
[models.health]
HEALTH
"""

ONE_VLLM = """
[[models]]
name = "tiny"
engine = "vllm"
model = "tiny-model"
vram_gib = 4.0
overhead_gib = 0.0
[models.health]
HEALTH
"""


async def test_fleet_comes_up_and_memory_is_where_the_plan_says(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, VLLM_AND_OLLAMA) as fleet:
        mimo = await fleet.wait_state("mimo-vl", WorkerState.READY)
        coder = await fleet.wait_state("deepcoder:14b", WorkerState.READY)
        qwen = await fleet.wait_state("qwen2.5vl:3b", WorkerState.READY)
        # best fit: the small specialist fills the hole beside MiMo, the coder gets gpu1
        assert (mimo.gpu_index, coder.gpu_index, qwen.gpu_index) == (0, 1, 0)
        claims = gpu_claims(fleet)
        # vLLM claims 0.75 of the card (12 GiB budget); Ollama what each model needs
        assert 12288 + 3000 < claims[0] <= 12288 + 3788
        assert 9000 < claims[1] <= 9728
        # the claim belongs to the engine's child (EngineCore), found through the process tree
        assert mimo.pid is not None
        tree = {mimo.pid, *(c.pid for c in psutil.Process(mimo.pid).children(recursive=True))}
        holders = {c.pid for c in fleet.host.claims() if c.used_mib == 12288}
        assert holders <= tree
        records = sorted(p.name for p in (tmp_path / "state" / "workers").glob("*.json"))
        assert len(records) == 3  # one vLLM worker, one Ollama server per GPU


async def test_kill_9_of_a_vllm_worker_is_restarted(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, ONE_VLLM) as fleet:
        first = await fleet.wait_state("tiny", WorkerState.READY)
        assert first.pid is not None
        children = psutil.Process(first.pid).children(recursive=True)
        os.kill(first.pid, signal.SIGKILL)
        await fleet.wait_state("tiny", WorkerState.BACKOFF, WorkerState.STARTING)
        again = await fleet.wait_state("tiny", WorkerState.READY)
        assert again.pid != first.pid
        assert again.restarts == 1
        # the orphaned EngineCore of the killed server was swept with its process group
        assert not [
            c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE
        ]
        assert fleet.kinds("tiny")[-3:] == [
            "worker.state_changed:backoff",
            "worker.state_changed:starting",
            "worker.state_changed:ready",
        ]
        assert "worker.crashed:" in fleet.kinds("tiny")


async def test_hung_worker_is_detected_and_restarted(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, ONE_VLLM) as fleet:
        first = await fleet.wait_state("tiny", WorkerState.READY)
        assert first.pid is not None
        os.kill(first.pid, signal.SIGUSR1)  # the emulator stops answering
        await fleet.wait_until("hung event", lambda: "worker.hung:" in fleet.kinds("tiny"))
        again = await fleet.wait_state("tiny", WorkerState.READY)
        assert again.pid != first.pid
        assert (
            not psutil.pid_exists(first.pid)
            or psutil.Process(first.pid).status() == psutil.STATUS_ZOMBIE
        )


async def test_crash_loop_ends_failed_with_the_reason(tmp_path: Path) -> None:
    env = '[engines.vllm.env]\nFLEETD_SIM_FAULTS = "exit_on_load"'
    async with running_fleet(tmp_path, ONE_VLLM, vllm_env=env) as fleet:
        failed = await fleet.wait_state("tiny", WorkerState.FAILED, timeout_s=60)
        assert "crash loop" in failed.reason
        assert "exited with code 1 while starting" in failed.reason
        assert failed.pid is None
        assert gpu_claims(fleet).get(0, 0) == 0  # nothing holds memory for it


async def test_crash_after_ready_is_restarted_with_backoff(tmp_path: Path) -> None:
    env = '[engines.vllm.env]\nFLEETD_SIM_FAULTS = "crash_after_s=0.5"'
    async with running_fleet(tmp_path, ONE_VLLM, vllm_env=env) as fleet:
        await fleet.wait_state("tiny", WorkerState.READY)
        await fleet.wait_until(
            "two restarts", lambda: fleet.status("tiny").restarts >= 2, timeout_s=30
        )
        reasons = [
            e.fields.get("reason", "") for e in fleet.seen if e.fields.get("new") == "backoff"
        ]
        assert any("restarting in" in r for r in reasons)


async def test_ollama_server_killed_models_are_reloaded(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, VLLM_AND_OLLAMA) as fleet:
        await fleet.wait_state("deepcoder:14b", WorkerState.READY)
        serve = await fleet.wait_state("ollama@gpu1", WorkerState.READY)
        assert serve.pid is not None
        os.kill(serve.pid, signal.SIGKILL)
        await fleet.wait_state("deepcoder:14b", WorkerState.BACKOFF, WorkerState.STARTING)
        await fleet.wait_state("ollama@gpu1", WorkerState.READY)
        await fleet.wait_state("deepcoder:14b", WorkerState.READY)
        new_pid = fleet.status("ollama@gpu1").pid
        assert new_pid != serve.pid
        # the old server's runner (same process group) was swept: one copy holds memory
        assert 9000 < gpu_claims(fleet)[1] <= 9728


async def test_missing_engine_binary_is_a_clear_failure(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, ONE_VLLM, vllm_command="/nonexistent/vllm") as fleet:
        failed = await fleet.wait_state("tiny", WorkerState.FAILED)
        assert failed.reason == "engine command '/nonexistent/vllm' does not exist"
        assert fleet.status("tiny").restarts == 0


async def test_worker_over_its_budget_raises_an_event(tmp_path: Path) -> None:
    env = '[engines.vllm.env]\nFLEETD_SIM_FAULTS = "leak_mib_per_s=2048"'
    async with running_fleet(tmp_path, ONE_VLLM, vllm_env=env) as fleet:
        await fleet.wait_state("tiny", WorkerState.READY)
        await fleet.wait_until(
            "over_budget event", lambda: "worker.over_budget:" in fleet.kinds("tiny"), timeout_s=20
        )
        event = next(e for e in fleet.seen if e.kind == "worker.over_budget")
        assert event.fields["budget_mib"] == 4096
        assert event.fields["used_mib"] > 4096


async def test_a_crash_fires_the_alert_hook(tmp_path: Path) -> None:
    out = tmp_path / "alerts.jsonl"
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\ncat >> {out}\necho >> {out}\n")
    hook.chmod(0o755)
    alerts = f'\n[[alerts.hooks]]\nkind = "exec"\ntarget = "{hook}"\nevents = ["worker.crashed"]\n'
    async with running_fleet(tmp_path / "f", ONE_VLLM + alerts) as fleet:
        first = await fleet.wait_state("tiny", WorkerState.READY)
        assert first.pid is not None
        os.kill(first.pid, signal.SIGKILL)
        await fleet.wait_until(
            "the hook ran", lambda: out.exists() and out.read_text().strip() != ""
        )
    event = json.loads(out.read_text().splitlines()[0])
    assert event["kind"] == "worker.crashed"
    assert event["worker"] == "tiny"
    assert "exited with code -9" in event["message"]
