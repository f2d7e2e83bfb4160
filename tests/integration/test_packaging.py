"""The systemd unit, sysusers.d and tmpfiles.d entries, checked by systemd's own tools."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGING = Path(__file__).resolve().parents[2] / "packaging"
FLEETD = Path(sys.executable).with_name("fleetd")


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (Debian package systemd)")
    return path


def test_unit_verifies_with_warnings_failing(tmp_path: Path) -> None:
    analyze = need("systemd-analyze")
    unit = (PACKAGING / "fleetd.service").read_text()
    assert "ExecStart=/usr/local/bin/fleetd run --config /etc/fleetd/fleetd.toml" in unit
    # verify needs ExecStart to exist: point it at this checkout's fleetd, change nothing else
    (tmp_path / "fleetd.service").write_text(unit.replace("/usr/local/bin/fleetd", str(FLEETD)))
    run = subprocess.run(
        [analyze, "verify", "--man=no", "--recursive-errors=no", str(tmp_path / "fleetd.service")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip() == "", run.stderr  # no warning either


def test_unit_makes_the_promised_choices() -> None:
    unit = (PACKAGING / "fleetd.service").read_text()
    settings = {
        line.split("=", 1)[0]: line.split("=", 1)[1]
        for line in unit.splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert settings["Type"] == "notify"
    assert settings["KillMode"] == "process"
    assert "PrivateDevices" not in settings  # it would hide /dev/nvidia*
    assert "MemoryDenyWriteExecute" not in settings  # PyTorch/Triton JIT need it off
    assert settings["WatchdogSec"]
    assert settings["RuntimeDirectory"] == "fleetd"  # /run/fleetd/control.sock
    assert settings["StateDirectory"] == "fleetd"
    assert settings["LogsDirectory"] == "fleetd"


def test_sysusers_creates_the_account_in_the_gpu_groups(tmp_path: Path) -> None:
    sysusers = need("systemd-sysusers")
    etc = tmp_path / "etc"
    etc.mkdir()
    for name in ("passwd", "shadow", "gshadow"):
        (etc / name).write_text("")
    (etc / "group").write_text("root:x:0:\nvideo:x:44:\nrender:x:105:\n")
    run = subprocess.run(
        [sysusers, f"--root={tmp_path}", str(PACKAGING / "sysusers.d" / "fleetd.conf")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    passwd = (etc / "passwd").read_text()
    assert passwd.startswith("fleetd:x:")
    assert ":/var/lib/fleetd:/usr/sbin/nologin" in passwd
    groups = (etc / "group").read_text()
    assert "video:x:44:fleetd" in groups
    assert "render:x:105:fleetd" in groups


def test_tmpfiles_entries_create_the_directories(tmp_path: Path) -> None:
    tmpfiles = need("systemd-tmpfiles")
    # tmpfiles resolves users on the host, where no fleetd account exists: check the syntax,
    # paths and modes with root as the owner
    conf = tmp_path / "fleetd.conf"
    conf.write_text(
        (PACKAGING / "tmpfiles.d" / "fleetd.conf")
        .read_text()
        .replace("fleetd -", "root -")
        .replace("fleetd fleetd", "root root")
    )
    run = subprocess.run(
        [tmpfiles, f"--root={tmp_path / 'root'}", "--create", str(conf)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    made = tmp_path / "root" / "var" / "cache" / "fleetd" / "tmp"
    assert made.is_dir()
    assert stat.S_IMODE(made.stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "root" / "etc" / "fleetd").stat().st_mode) == 0o750
