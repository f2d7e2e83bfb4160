"""fleetctl's pure parts: status rendering, durations, memory bars, --wait verdicts, arguments."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from fleetd.api.schemas import GpuJson, Status, WorkerJson
from fleetd.cli import fleetctl, fleetctl_render
from fleetd.cli.fleetctl_render import (
    bar_cells,
    clip,
    fmt_duration,
    memory_bar,
    render_status,
    visible_len,
)

H100_MIB = 81559


def gpu(index: int, **kw: Any) -> GpuJson:
    base: GpuJson = {
        "index": index,
        "uuid": f"GPU-{index:08d}-1111-2222-3333-444444444444",
        "name": "NVIDIA H100 80GB HBM3",
        "health": "healthy",
        "health_reason": "",
        "status": "ok",
        "total_mib": H100_MIB,
        "used_mib": 70000,
        "ours_mib": 65000,
        "foreign_mib": 5000,
        "free_mib": H100_MIB - 70000,
        "temperature_c": 71,
        "utilization_pct": 100,
        "power_w": 650.0,
        "processes": [],
    }
    base.update(kw)  # type: ignore[typeddict-item]
    return base


def worker(name: str, gpu_index: int, **kw: Any) -> WorkerJson:
    base: WorkerJson = {
        "name": name,
        "engine": "vllm",
        "kind": "process",
        "models": [name.split("#", maxsplit=1)[0]],
        "gpu": gpu_index,
        "gpu_uuid": f"GPU-{gpu_index:08d}-1111-2222-3333-444444444444",
        "state": "ready",
        "reason": "health check passed",
        "since_s": 4000.0,
        "uptime_s": 4000.0,
        "restarts": 0,
        "port": 8000 + gpu_index,
        "in_flight": 0,
        "pid": 1000 + gpu_index,
        "vram_mib": 65000,
        "budget_mib": 72000,
    }
    base.update(kw)  # type: ignore[typeddict-item]
    return base


LONG_REASON = (
    "meta-llama/Llama-3.1-405B-Instruct-FP8-with-a-very-long-deployment-name needs 420.0 GiB; "
    "gpu0 has 0.5 GiB free (qwen2.5-72b 72.0 GiB); gpu1 has 0.5 GiB free (qwen2.5-72b#1 72.0 "
    "GiB); gpu2 is lost: XID 79 (GPU has fallen off the bus); every other GPU is full"
)


def eight_gpus() -> Status:
    gpus = [gpu(i) for i in range(8)]
    gpus[2] = gpu(
        2,
        health="lost",
        health_reason="XID 79: GPU has fallen off the bus",
        status="lost: XID 79 (GPU has fallen off the bus), evacuated",
    )
    gpus[5] = gpu(5, status="cordoned")
    workers = [worker(f"qwen2.5-72b-instruct-awq-long-name#{i}", i) for i in range(8)]
    workers[3] = worker(
        "deepseek-r1-distill-llama-70b-with-an-absurdly-long-worker-name",
        3,
        state="backoff",
        uptime_s=None,
        since_s=4.0,
        restarts=12,
        vram_mib=None,
        reason="exited with code 137 (killed by signal 9: out of memory?) " * 3,
    )
    return {
        "version": "0.1.0",
        "pid": 4242,
        "uptime_s": 200000.0,
        "backend": "nvml",
        "gpus": gpus,
        "workers": workers,
        "pending": [
            {
                "model": "meta-llama/Llama-3.1-405B-Instruct-FP8-long",
                "replica": 0,
                "reason": LONG_REASON,
            },
            {"model": "mimo-vl", "replica": 1, "reason": "mimo-vl needs 18.0 GiB; " * 6},
        ],
        "overrides": {
            "replicas": {f"model-{i}": i for i in range(12)},
            "cordoned": ["GPU-00000005-1111-2222-3333-444444444444", "GPU-unknown"],
            "fault_cordoned": [],
            "drained_gpus": [],
            "drained_models": ["a-model-name-that-goes-on-and-on-and-on"] * 4,
            "drained_workers": [],
        },
        "config_path": "/etc/fleetd/a/very/long/path/to/the/configuration/file/fleetd.toml",
        "gateway": None,
    }


# --- layout --------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [80, 100, 132, 60, 40])
@pytest.mark.parametrize("colour", [False, True])
def test_status_fits_the_terminal(width: int, colour: bool) -> None:
    lines = render_status(eight_gpus(), width=width, colour=colour)
    too_wide = [line for line in lines if visible_len(line) > width]
    assert too_wide == []


def test_status_at_80_columns_keeps_what_matters() -> None:
    lines = render_status(eight_gpus(), width=80, colour=False)
    text = "\n".join(lines)
    gpu_rows = [line for line in lines if line.startswith(tuple(f"  {i}  " for i in range(8)))]
    assert len(gpu_rows) == 8
    assert all("H100 80GB HBM3" in row for row in gpu_rows)  # "NVIDIA " dropped, name whole
    assert all("[" in row and "]" in row for row in gpu_rows)
    assert "lost" in gpu_rows[2]
    assert "XID 79 (GPU has fallen off the bus)" in text.replace("\n", " ").replace("  ", " ")
    assert "cordoned" in gpu_rows[5]
    names = [line.split()[0] for line in lines if " vllm " in line]
    assert len(set(names)) == 8  # truncated in the middle: the replica suffix stays
    assert all(name.endswith(f"#{i}") for i, name in enumerate(names) if i != 3)
    assert "backoff" in text
    assert "4.0 GiB" not in text  # memory is in the GiB columns, unit in the legend
    # the long pending reason is wrapped, not cut: every word survives
    flat = " ".join(text.split())
    assert "every other GPU is full" in flat
    assert "gpu5" in text  # cordoned UUIDs shown as gpuN
    assert "GPU-unknown" in text  # and unknown ones as they are
    assert "\x1b" not in text


def test_worker_table_columns() -> None:
    status = eight_gpus()
    status["workers"] = [
        worker("mimo-vl", 0, uptime_s=192.0, vram_mib=15565, budget_mib=16384, port=8001),
        worker("ollama@gpu1", 1, engine="ollama", models=[], vram_mib=None, budget_mib=0),
    ]
    lines = render_status(status, width=80, colour=False)
    header = next(line for line in lines if line.lstrip().startswith("NAME"))
    assert header.split() == [
        "NAME",
        "ENGINE",
        "GPU",
        "STATE",
        "UPTIME",
        "RESTARTS",
        "PORT",
        "VRAM/BUDGET",
    ]
    row = lines[lines.index(header) + 1]
    assert row.split() == ["mimo-vl", "vllm", "0", "ready", "3m12s", "0", "8001", "15.2/16.0"]
    server = lines[lines.index(header) + 2]
    assert server.split()[-1] == "-"  # an Ollama server has no budget of its own


def test_empty_fleet() -> None:
    status = eight_gpus()
    status["gpus"], status["workers"], status["pending"] = [], [], []
    status["overrides"] = {
        "replicas": {},
        "cordoned": [],
        "fault_cordoned": [],
        "drained_gpus": [],
        "drained_models": [],
        "drained_workers": [],
    }
    text = "\n".join(render_status(status, width=80, colour=False))
    assert "WORKERS (0)\n  none" in text
    assert "PENDING  none" in text
    assert "OVERRIDES  none" in text


def test_colour_only_when_asked() -> None:
    plain = render_status(eight_gpus(), width=80, colour=False)
    painted = render_status(eight_gpus(), width=80, colour=True)
    assert not any("\x1b" in line for line in plain)
    assert any("\x1b[32m" in line for line in painted)  # ready / ours in green
    assert [fleetctl_render._ANSI.sub("", line) for line in painted] == plain


def test_clip_counts_visible_columns_only() -> None:
    red = "\x1b[31mabcdef\x1b[0m"
    assert clip(red, 10) == red
    cut = clip(red + "ghij", 5)
    assert visible_len(cut) == 5
    assert cut.endswith("…\x1b[0m")


# --- pieces --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (-1.0, "-"),
        (0.0, "0s"),
        (42.9, "42s"),
        (192.0, "3m12s"),
        (3599.0, "59m59s"),
        (3600.0 + 300, "1h05m"),
        (7500.0, "2h05m"),
        (86400.0 + 3 * 3600, "1d03h"),
    ],
)
def test_durations(seconds: float | None, text: str) -> None:
    assert fmt_duration(seconds) == text


@pytest.mark.parametrize(
    ("ours", "foreign", "total", "cells", "expected"),
    [
        (8192, 0, 16384, 20, (10, 0, 10)),
        (8192, 4096, 16384, 20, (10, 5, 5)),
        (0, 0, 16384, 10, (0, 0, 10)),
        (16384, 0, 16384, 10, (10, 0, 0)),
        (0, 10, 16384, 10, (0, 1, 9)),  # a tiny foreign process still shows
        (16000, 300, 16384, 10, (8, 1, 1)),  # rounding would hide foreign and free...
        (16000, 384, 16384, 10, (9, 1, 0)),  # ...and nothing is free here
        (100, 100, 0, 8, (0, 0, 8)),  # no total reported
    ],
)
def test_bar_proportions(
    ours: int, foreign: int, total: int, cells: int, expected: tuple[int, int, int]
) -> None:
    got = bar_cells(ours, foreign, total, cells)
    assert got == expected
    assert sum(got) == cells


def test_memory_bar_text() -> None:
    assert memory_bar(8192, 4096, 16384, 8) == "[####==..]"
    bar = memory_bar(15000, 512, 16376, 17)
    assert len(bar) == 19
    assert (bar.count("#"), bar.count("="), bar.count(".")) == (15, 1, 1)


def test_event_line() -> None:
    ts = 1_700_000_000.5
    line = fleetctl_render.render_event(
        {"seq": 12, "ts": ts, "kind": "worker.ready", "message": "mimo-vl is ready"}
    )
    assert (
        line == f"{time.strftime('%H:%M:%S', time.localtime(ts))} 12 worker.ready mimo-vl is ready"
    )


def test_explain_wraps_sentences() -> None:
    lines = fleetctl_render.render_explain(
        {
            "model": "m",
            "engine": "vllm",
            "budget_mib": 1,
            "priority": 1,
            "replicas_wanted": 1,
            "lines": ["word " * 40, "  indented event"],
            "placements": [],
            "pending": [],
        },
        width=60,
    )
    assert all(len(line) <= 60 for line in lines)
    assert lines[1].startswith("  word")
    assert lines[-1] == "  indented event"


# --- --wait verdicts -----------------------------------------------------------------------------


def small_status(*workers: WorkerJson) -> Status:
    status = eight_gpus()
    status["workers"], status["pending"] = list(workers), []
    return status


def test_drain_worker_is_matched_on_its_gpu() -> None:
    before = small_status(worker("mimo-vl", 0))
    goal = fleetctl_render.drain_goal("worker", "mimo-vl", before)
    assert goal.verdict(before, 1.0) == "worker mimo-vl is ready on gpu0"
    moved = small_status(worker("mimo-vl", 1, state="starting"))  # the replacement, elsewhere
    assert goal.verdict(moved, 2.0) == (
        True,
        "worker mimo-vl is gone; its replacement is starting on gpu1",
    )
    stopped = small_status(worker("mimo-vl", 0, state="stopped"))
    assert goal.verdict(stopped, 2.0) == (True, "worker mimo-vl is stopped")


def test_drain_model_ignores_ollama_servers() -> None:
    server = worker("ollama@gpu1", 1, engine="ollama", models=[])
    slot = worker("deepcoder:14b", 1, engine="ollama", kind="model", state="stopping")
    goal = fleetctl_render.drain_goal("model", "deepcoder:14b", None)
    assert goal.verdict(small_status(server, slot), 1.0)[0] is True
    gpu_goal = fleetctl_render.drain_goal("gpu", "gpu1", None)
    assert gpu_goal.verdict(small_status(server, slot), 1.0) == (
        "1 still running: ollama@gpu1 (ready on gpu1)"
    )


def test_restart_needs_a_new_life() -> None:
    goal = fleetctl_render.Restarted("mimo-vl", old_pid=1000)
    assert goal.verdict(small_status(worker("mimo-vl", 0, pid=1000)), 1.0) == (
        "worker mimo-vl is ready"
    )
    assert goal.verdict(small_status(worker("mimo-vl", 0, pid=2000)), 1.0)[0] is True
    slot = worker("m", 0, kind="model", pid=1000, since_s=0.4)  # same server pid, new load
    assert fleetctl_render.Restarted("m", 1000).verdict(small_status(slot), 1.0)[0] is True
    old_failure = worker("mimo-vl", 0, state="failed", since_s=50.0)
    assert isinstance(goal.verdict(small_status(old_failure), 1.0), str)
    new_failure = worker("mimo-vl", 0, state="failed", since_s=0.2, reason="crash loop")
    assert goal.verdict(small_status(new_failure), 1.0) == (
        False,
        "worker mimo-vl failed: crash loop",
    )


def test_scale_counts_ready_replicas_and_fails_on_pending() -> None:
    goal = fleetctl_render.Scaled("mimo-vl", 2)
    one = small_status(worker("mimo-vl", 0), worker("mimo-vl#1", 1, state="starting"))
    assert goal.verdict(one, 1.0) == "1 of 2 ready; mimo-vl#1 (starting on gpu1)"
    two = small_status(worker("mimo-vl", 0), worker("mimo-vl#1", 1))
    assert goal.verdict(two, 1.0) == (True, "model mimo-vl has 2 ready replica(s)")
    pending = small_status(worker("mimo-vl", 0))
    pending["pending"] = [{"model": "mimo-vl", "replica": 1, "reason": "no room"}]
    assert goal.verdict(pending, 1.0) == (False, "model mimo-vl is pending: replica 1: no room")
    # scaling down to 1: the pending replica 1 is no longer wanted
    assert fleetctl_render.Scaled("mimo-vl", 1).verdict(pending, 1.0)[0] is True


def test_events_are_relevant_when_they_name_the_target() -> None:
    goal = fleetctl_render.drain_goal("gpu", "1", None)
    event = {"seq": 1, "ts": 0.0, "kind": "gpu.drain", "message": "drain gpu1"}
    assert goal.relevant(event)  # type: ignore[arg-type]
    assert not goal.relevant({"seq": 2, "ts": 0.0, "kind": "gpu.sample", "message": "gpu0 ok"})
    extra = {"seq": 3, "ts": 0.0, "kind": "worker.state", "message": "stopped", "gpu": "gpu1"}
    assert goal.relevant(extra)  # type: ignore[arg-type]


# --- arguments -----------------------------------------------------------------------------------


def parse(*argv: str) -> dict[str, Any]:
    return vars(fleetctl.build_parser().parse_args(argv))


def test_global_options_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    args = parse("status")
    assert args == {"socket": None, "http_timeout": 10.0, "json": False, "command": "status"}
    assert parse("--json", "status")["json"] is True
    assert parse("status", "--json")["json"] is True
    assert parse("status", "--socket", "/x.sock")["socket"] == "/x.sock"
    assert parse("--timeout", "2.5", "status")["http_timeout"] == 2.5
    assert parse("status", "--timeout", "3")["http_timeout"] == 3.0


def test_command_arguments() -> None:
    scale = parse("scale", "mimo-vl", "2", "--wait")
    assert (scale["model"], scale["replicas"], scale["wait"], scale["wait_timeout"]) == (
        "mimo-vl",
        2,
        True,
        600.0,
    )
    drain = parse(
        "--timeout", "5", "drain", "gpu", "0", "--wait", "--timeout", "30", "--grace", "9"
    )
    assert (drain["target"], drain["name"], drain["grace"]) == ("gpu", "0", 9.0)
    assert (drain["http_timeout"], drain["wait_timeout"]) == (5.0, 30.0)
    events = parse("events", "--since", "7", "--follow", "--kind", "worker.")
    assert (events["since"], events["follow"], events["kind"]) == (7, True, "worker.")
    logs = parse("logs", "mimo-vl", "-n", "20", "-f")
    assert (logs["worker"], logs["lines"], logs["follow"]) == ("mimo-vl", 20, True)
    assert parse("restart", "mimo-vl#1")["worker"] == "mimo-vl#1"
    assert parse("cordon", "GPU-1234")["gpu"] == "GPU-1234"
    assert parse("undrain", "model", "x")["target"] == "model"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["scale", "m", "-1"],
        ["scale", "m", "two"],
        ["drain", "rack", "r1"],
        ["drain", "worker"],
        ["--timeout", "0", "status"],
        ["restart", "w", "--wait", "--timeout", "nan"],
        ["logs", "w", "--lines", "-5"],
        ["reload", "--wait"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert fleetctl.main(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_help_lists_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert fleetctl.main(["--help"]) == 0
    out = capsys.readouterr().out
    for line in ("0    ok", "2    usage error", "4    --wait ran out of time", "130  interrupted"):
        assert line in out


def test_socket_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere.sock"
    monkeypatch.setenv("FLEETD_SOCKET", str(missing))
    assert fleetctl.main(["status"]) == 3
    assert f"no socket at {missing}" in capsys.readouterr().err


def test_gateway_line_fits_80_columns_and_standby_is_named() -> None:
    status = eight_gpus()
    status["gateway"] = {
        "url": "http://127.0.0.1:8000/v1",
        "in_flight": 3,
        "requests": 12345,
        "retries": 2,
        "fallbacks": 17,
        "refused": 4,
        "upstream_failed": 0,
        "mid_stream_failures": 1,
        "client_disconnects": 5,
    }
    status["pending"] = [{"model": "mimo-vl", "replica": 64, "reason": "gpu1 has no room"}]
    lines = render_status(status, width=80, colour=False)
    line = next(x for x in lines if x.startswith("gateway "))
    assert line.startswith(
        "gateway http://127.0.0.1:8000/v1  3 in flight, 17 fallback, 1 cut, 2 retry, 123"
    )
    assert len(line) <= 80
    assert any("mimo-vl~standby" in x for x in lines)
