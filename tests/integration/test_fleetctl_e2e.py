"""fleetctl as an operator uses it, against a real `fleetd demo` daemon and real engines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from demo_proc import DemoDaemon, demo_daemon

pytestmark = pytest.mark.timeout(300)


def fleetctl(sock: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetd.cli.fleetctl", "--socket", str(sock), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "COLUMNS": "80", "NO_COLOR": "1"},
    )


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoDaemon]:
    with demo_daemon(tmp_path_factory.mktemp("ctl") / "demo", long_lived=True) as d:
        yield d


def test_status_fits_80_columns_and_tells_the_story(daemon: DemoDaemon) -> None:
    run = fleetctl(daemon.socket, "status")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    text = run.stdout
    for name in ("mimo-vl", "deepcoder:14b", "ollama@gpu1", "deepseek-r1:32b"):
        assert name in text
    assert "needs 5.5 GiB" in text


def test_status_json_is_the_api_document(daemon: DemoDaemon) -> None:
    run = fleetctl(daemon.socket, "status", "--json")
    doc = json.loads(run.stdout)
    assert {w["name"] for w in doc["workers"]} >= {"mimo-vl", "ollama@gpu1"}
    assert doc["gpus"][0]["ours_mib"] == 16384


def test_explain(daemon: DemoDaemon) -> None:
    run = fleetctl(daemon.socket, "explain", "mimo-vl")
    assert run.returncode == 0
    assert "Replica 0 is placed on gpu0" in run.stdout


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["scale", "nope", "1"], 1, "no model is called 'nope'"),
        (["scale", "mimo-vl", "-1"], 2, ""),
        (["scale", "mimo-vl", "lots"], 2, ""),
        (["scale", "mimo-vl", "99"], 1, "replicas must be 0-64"),
        (["explain", "nope"], 1, "unknown_model"),
        (["drain", "gpu", "9"], 1, "no GPU '9'"),
        (["restart", "nope"], 1, "no worker is called 'nope'"),
        (["undrain", "model", "mimo-vl"], 1, "is not drained"),
        (["logs", "nope"], 1, "no worker is called 'nope'"),
    ],
)
def test_refusals(daemon: DemoDaemon, args: list[str], code: int, words: str) -> None:
    run = fleetctl(daemon.socket, *args)
    assert run.returncode == code, (run.stdout, run.stderr)
    assert words in run.stderr + run.stdout
    assert "Traceback" not in run.stderr


def test_no_daemon_is_one_clear_line(tmp_path: Path) -> None:
    run = fleetctl(tmp_path / "none.sock", "status")
    assert run.returncode == 3
    assert "fleetd is not running" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_permission_denied_is_one_clear_line(daemon: DemoDaemon) -> None:
    if os.geteuid() == 0:
        # root bypasses file permissions; run the client as nobody instead
        run = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
             "-m", "fleetd.cli.fleetctl", "--socket", str(daemon.socket), "status"],
            capture_output=True, text=True, timeout=30, check=False,
            cwd="/", env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )  # fmt: skip
        if "setpriv" in run.stderr and run.returncode == 127:
            pytest.skip("setpriv is not available")
    else:
        run = fleetctl(daemon.socket, "status")
    if run.returncode == 0:
        pytest.skip("this user may use the socket (its directory and mode allow it)")
    assert run.returncode == 3, run.stderr
    assert "permission denied" in run.stderr


def test_cordon_uncordon_and_concurrent_commands(daemon: DemoDaemon) -> None:
    results: list[int] = []

    def run(args: list[str]) -> None:
        results.append(fleetctl(daemon.socket, *args).returncode)

    threads = [
        threading.Thread(target=run, args=(["cordon", "1"] if i % 2 else ["status"],))
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [0] * 8
    assert daemon.status()["overrides"]["cordoned"]
    assert fleetctl(daemon.socket, "uncordon", "1").returncode == 0
    assert daemon.status()["overrides"]["cordoned"] == []


def test_restart_wait_brings_a_new_process(daemon: DemoDaemon) -> None:
    before = daemon.workers()["mimo-vl"]["pid"]
    run = fleetctl(daemon.socket, "restart", "mimo-vl", "--wait", "--timeout", "60")
    assert run.returncode == 0, run.stdout + run.stderr
    after = daemon.workers()["mimo-vl"]
    assert after["state"] == "ready"
    assert after["pid"] != before


def test_drain_model_wait_then_undrain(daemon: DemoDaemon) -> None:
    run = fleetctl(daemon.socket, "drain", "model", "mixtral:8x22b", "--wait", "--timeout", "60")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "mixtral:8x22b" not in daemon.workers()
    run = fleetctl(daemon.socket, "undrain", "model", "mixtral:8x22b")
    assert run.returncode == 0
    daemon.wait(
        "mixtral back", lambda d: d.workers().get("mixtral:8x22b", {}).get("state") == "ready"
    )


def test_scale_to_zero_and_back_with_wait(daemon: DemoDaemon) -> None:
    run = fleetctl(daemon.socket, "scale", "qwen2.5vl:3b", "0", "--wait", "--timeout", "60")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "qwen2.5vl:3b" not in daemon.workers()
    run = fleetctl(daemon.socket, "scale", "qwen2.5vl:3b", "1", "--wait", "--timeout", "60")
    assert run.returncode == 0, run.stdout + run.stderr
    assert daemon.workers()["qwen2.5vl:3b"]["state"] == "ready"


def test_events_and_logs(daemon: DemoDaemon) -> None:
    run = fleetctl(daemon.socket, "events")
    assert run.returncode == 0
    assert "worker.state_changed" in run.stdout
    run = fleetctl(daemon.socket, "events", "--json")
    first = json.loads(run.stdout.splitlines()[0])
    assert first["seq"] >= 1
    run = fleetctl(daemon.socket, "logs", "mimo-vl", "--lines", "5")
    assert run.returncode == 0
    assert 0 < len(run.stdout.splitlines()) <= 5


def test_reload_with_a_broken_file_keeps_running(tmp_path: Path) -> None:
    config = tmp_path / "fleetd.toml"
    example = Path(__file__).resolve().parents[2] / "etc" / "fleetd.toml"
    config.write_text(example.read_text())
    with demo_daemon(tmp_path / "demo", config=config) as d:
        config.write_text("this is [not toml")
        run = fleetctl(d.socket, "reload")
        assert run.returncode == 1
        assert "not valid TOML" in run.stderr
        assert "config_invalid" in run.stderr
        assert d.workers()["mimo-vl"]["state"] == "ready"
        config.write_text(example.read_text())
        assert fleetctl(d.socket, "reload").returncode == 0
