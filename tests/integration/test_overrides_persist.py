"""Operator overrides survive a daemon restart; a corrupt state file is set aside, loudly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from demo_proc import call, demo_daemon

pytestmark = pytest.mark.timeout(300)


def test_overrides_survive_a_restart(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    with demo_daemon(root) as daemon:
        assert call(daemon.socket, "POST", "/v1/gpus/1/cordon", b"{}")[0] == 200
        code, _ = call(
            daemon.socket, "POST", "/v1/drain", b'{"target": "model", "name": "mixtral:8x22b"}'
        )
        assert code == 200
        daemon.wait(
            "mixtral unloaded",
            lambda d: "mixtral:8x22b" not in d.workers(),
        )
        code, _ = call(
            daemon.socket, "POST", "/v1/models/deepseek-r1:32b/scale", b'{"replicas": 0}'
        )
        assert code == 200
        daemon.wait("nothing pending", lambda d: d.status()["pending"] == [])
    saved = json.loads((root / "state" / "overrides.json").read_text())
    assert saved["drained_models"] == ["mixtral:8x22b"]
    assert saved["replicas"] == {"deepseek-r1:32b": 0}
    with demo_daemon(root, ready=("mimo-vl",)) as again:
        again.wait("a plan", lambda d: len(d.status()["pending"]) == 2)
        status = again.status()
        assert status["overrides"]["drained_models"] == ["mixtral:8x22b"]
        assert status["overrides"]["replicas"] == {"deepseek-r1:32b": 0}
        assert len(status["overrides"]["cordoned"]) == 1
        assert "mixtral:8x22b" not in again.workers()
        # gpu1 is still cordoned and fleetd stopped its engines on exit (on_exit = "stop"),
        # so nothing new may start there: the specialists wait, and say why
        reasons = {p["model"]: p["reason"] for p in status["pending"]}
        assert set(reasons) == {"deepcoder:14b", "qwen2.5vl:3b"}
        assert all("gpu1 is cordoned" in r for r in reasons.values())
        _, events = call(again.socket, "GET", "/v1/events?kind=state.")
        assert "restored operator overrides" in json.dumps(events)


def test_corrupt_overrides_file_is_set_aside_and_reported(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    state = root / "state"
    state.mkdir(parents=True)
    (state / "overrides.json").write_text('{"format": 1, "replicas": {"x": -3}')
    with demo_daemon(root) as daemon:
        status = daemon.status()
        assert status["overrides"]["replicas"] == {}  # carried on from the config
        _, events = call(daemon.socket, "GET", "/v1/events?kind=state.overrides_unreadable")
        assert "is corrupt" in json.dumps(events)
        aside = list(state.glob("overrides.json.bad-*"))
        assert len(aside) == 1
        assert aside[0].read_text().startswith('{"format": 1')
