"""`fleetd plan` as a user runs it: a real subprocess, its output and exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "etc" / "fleetd.toml"


def fleetd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"COLUMNS": "100", "PATH": "/usr/bin:/bin", "NO_COLOR": "1"},
    )


def test_plan_of_the_example_on_the_simulated_host() -> None:
    run = fleetd("plan", str(EXAMPLE), "--simulate")
    assert run.returncode == 0, run.stderr
    assert "mimo-vl" in run.stdout
    assert "deepseek-r1:32b needs 5.5 GiB" in run.stdout
    assert "4 replica(s) placed, 1 pending, 0 to stop" in run.stdout
    assert "Traceback" not in run.stdout + run.stderr


def test_plan_json_is_machine_readable() -> None:
    run = fleetd("plan", str(EXAMPLE), "--simulate", "--json")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    placed = {(p["model"], p["gpu_index"]) for p in doc["plan"]["placements"]}
    assert ("mimo-vl", 0) in placed
    assert [p["model"] for p in doc["plan"]["pending"]] == ["deepseek-r1:32b"]
    assert len(doc["host"]["gpus"]) == 2


def test_what_if_gpu0_is_lost_moves_mimo_and_evicts_specialists() -> None:
    run = fleetd("plan", str(EXAMPLE), "--simulate", "--lost", "0", "--json")
    doc = json.loads(run.stdout)
    placed = {p["model"]: p["gpu_index"] for p in doc["plan"]["placements"]}
    assert placed == {"mimo-vl": 1}
    reasons = {p["model"]: p["reason"] for p in doc["plan"]["pending"]}
    assert "gpu0 is lost" in reasons["deepcoder:14b"]
    assert "gpu1 has 0.0 GiB free (mimo-vl 16.0 GiB)" in reasons["deepcoder:14b"]


def test_foreign_process_blocks_failover_with_its_pid() -> None:
    run = fleetd("plan", str(EXAMPLE), "--simulate", "--lost", "0", "--foreign", "1:512")
    assert run.returncode == 0
    assert "pid 4242 not ours 0.5 GiB" in run.stdout.replace("\n", " ").replace("  ", " ")


def test_fail_on_pending_exit_code() -> None:
    assert fleetd("plan", str(EXAMPLE), "--simulate", "--fail-on-pending").returncode == 1
    assert (
        fleetd(
            "plan", str(EXAMPLE), "--simulate", "--scale", "deepseek-r1:32b=0", "--fail-on-pending"
        ).returncode
        == 0
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--foreign", "x"], "expected two whole numbers as GPU:N"),
        (["--lost", "5"], "the simulated host has 2 GPU(s), indices 0-1"),
        (["--scale", "nope=2"], "no model is named 'nope'"),
        (["--scale", "mimo-vl"], "expected MODEL=N"),
    ],
)
def test_bad_what_if_arguments_are_refused_clearly(args: list[str], message: str) -> None:
    run = fleetd("plan", str(EXAMPLE), "--simulate", *args)
    assert run.returncode == 2
    assert message in run.stderr
    assert "Traceback" not in run.stderr


def test_without_nvml_plan_says_what_to_do() -> None:
    run = fleetd("plan", str(EXAMPLE))
    try:
        import pynvml  # noqa: PLC0415 - only this test asks whether NVML works here

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - any failure means: no usable NVML here
        assert run.returncode == 3
        assert "--simulate" in run.stderr
    else:
        pytest.skip("NVML works on this machine; the no-driver message cannot be shown")


def test_missing_config_file() -> None:
    run = fleetd("plan", "/nonexistent/fleetd.toml", "--simulate")
    assert run.returncode == 2
    assert "file not found" in run.stderr
