"""Restarting fleetd reloads no model: the next fleetd adopts the engines the last one left."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import psutil
import pytest
from demo_proc import READY_WORKERS, call, demo_daemon

pytestmark = pytest.mark.timeout(300)


def engine_pids(workers: dict[str, dict[str, object]]) -> dict[str, int]:
    return {
        name: int(str(w["pid"]))
        for name, w in workers.items()
        if w["kind"] == "process" and w["pid"] is not None
    }


def test_kill_9_of_fleetd_then_restart_adopts_every_engine(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    with demo_daemon(root) as first:
        before = engine_pids(first.workers())
        assert set(before) == {"mimo-vl", "ollama@gpu1"}
        runners = {c.pid for c in psutil.Process(before["ollama@gpu1"]).children()}
        assert len(runners) == 3  # one runner per loaded Ollama model
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
        for pid in before.values():  # the engines outlive fleetd
            assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    with demo_daemon(root) as second:
        after = second.workers()
        assert engine_pids(after) == before, "an engine was restarted instead of adopted"
        assert all(after[n]["restarts"] == 0 for n in READY_WORKERS)
        _, events = call(second.socket, "GET", "/v1/events")
        lines = (
            [json.loads(line) for line in events.splitlines()]
            if isinstance(events, str)
            else [events]
        )
        kinds = [e["kind"] for e in lines]
        assert kinds.count("worker.adopted") == 2
        starts = [e for e in lines if e.get("new") == "starting" and e.get("engine") == "vllm"]
        assert starts == [], "vLLM was started again"
        # Ollama models already loaded are re-pinned (keep_alive -1), not loaded again: the
        # same runner processes hold them
        code, ps = call_ollama_ps(after["ollama@gpu1"]["port"])
        assert code == 200
        assert {m["name"] for m in ps["models"]} == {
            "deepcoder:14b",
            "qwen2.5vl:3b",
            "mixtral:8x22b",
        }
        assert {c.pid for c in psutil.Process(before["ollama@gpu1"]).children()} == runners


def call_ollama_ps(port: object) -> tuple[int, dict[str, list[dict[str, object]]]]:
    import urllib.request  # noqa: PLC0415

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/ps", timeout=5) as resp:
        return resp.status, json.loads(resp.read())


EXAMPLE = Path(__file__).resolve().parents[2] / "etc" / "fleetd.toml"


def test_on_exit_leave_then_restart_reloads_nothing(tmp_path: Path) -> None:
    config = tmp_path / "fleetd.toml"
    config.write_text(EXAMPLE.read_text().replace('on_exit = "stop"', 'on_exit = "leave"'))
    root = tmp_path / "demo"
    with demo_daemon(root, config=config) as first:
        before = engine_pids(first.workers())
    assert first.proc.returncode == 0  # a clean SIGTERM stop that left the engines running
    for pid in before.values():
        assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    with demo_daemon(root, config=config) as second:
        assert engine_pids(second.workers()) == before
    # the second one left them too: clean up as an operator would with on_exit = "stop"
    for pid in before.values():
        for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
            proc.kill()


def test_only_the_dead_are_restarted(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    with demo_daemon(root) as first:
        before = engine_pids(first.workers())
        vllm = psutil.Process(before["mimo-vl"])
        core = vllm.children(recursive=True)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
        vllm.kill()  # dies while no fleetd watches; its EngineCore is orphaned with the VRAM
        vllm.wait(5)
    with demo_daemon(root) as second:
        after = engine_pids(second.workers())
        assert after["ollama@gpu1"] == before["ollama@gpu1"]  # adopted
        assert after["mimo-vl"] != before["mimo-vl"]  # started again
        assert all(not c.is_running() or c.status() == psutil.STATUS_ZOMBIE for c in core)
        _, events = call(second.socket, "GET", "/v1/events?kind=worker.record_dropped")
        assert "its process is gone" in json.dumps(events)


def test_upgrade_procedure_reload_to_leave_then_restart(tmp_path: Path) -> None:
    """docs/operations.md: switch on_exit to leave with a reload, restart, nothing reloads."""
    config = tmp_path / "fleetd.toml"
    config.write_text(EXAMPLE.read_text())
    root = tmp_path / "demo"
    with demo_daemon(root, config=config) as first:
        before = engine_pids(first.workers())
        config.write_text(EXAMPLE.read_text().replace('on_exit = "stop"', 'on_exit = "leave"'))
        code, result = call(first.socket, "POST", "/v1/reload", b"{}")
        assert code == 200, result
    assert first.proc.returncode == 0
    with demo_daemon(root, config=config) as second:
        assert engine_pids(second.workers()) == before
        config.write_text(EXAMPLE.read_text())  # back to stop: this fleetd cleans up
        assert call(second.socket, "POST", "/v1/reload", b"{}")[0] == 200
    for pid in before.values():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
