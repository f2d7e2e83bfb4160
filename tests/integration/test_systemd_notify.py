"""The sd_notify protocol, checked against a real datagram socket playing systemd's part."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fleetd.obs.systemd import Notifier

pytestmark = pytest.mark.timeout(120)


class FakeSystemd:
    """Receives notification datagrams like PID 1 does."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []

    def read_until(
        self, key: str, value: str | None = None, timeout_s: float = 60
    ) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            msg = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append(msg)
            if key in msg and (value is None or msg[key] == value):
                return msg
        raise AssertionError(f"no {key}={value} within {timeout_s} s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


def test_notifier_is_a_no_op_without_systemd() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.notify(ready=1) is False


def test_abstract_socket_address(tmp_path: Path) -> None:
    name = f"fleetd-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).notify(status="hello")
        assert sock.recv(100) == b"STATUS=hello"
    finally:
        sock.close()


def test_watchdog_pid_of_another_process_disables_the_watchdog() -> None:
    env = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    assert Notifier(env).watchdog_interval_s is None
    env["WATCHDOG_PID"] = str(os.getpid())
    assert Notifier(env).watchdog_interval_s == 0.5


def test_daemon_lifecycle_messages(tmp_path: Path) -> None:
    systemd = FakeSystemd(tmp_path / "notify.sock")
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(systemd.path),
        "WATCHDOG_USEC": "1000000",  # ping every 0.5 s
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetd",
            "demo",
            "--dir",
            str(tmp_path / "demo"),
            "--load-s",
            "0.3",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ready = systemd.read_until("READY", "1")
        assert "workers ready" in ready["STATUS"]
        assert (tmp_path / "demo" / "control.sock").exists()  # the socket is up before READY
        first_ping = systemd.read_until("WATCHDOG", "1", timeout_s=5)
        assert first_ping == {"WATCHDOG": "1"}
        systemd.read_until("WATCHDOG", "1", timeout_s=5)  # and again
        # engines never see systemd's variables
        for child in psutil.Process(proc.pid).children(recursive=True):
            env_of_child = child.environ()
            assert "NOTIFY_SOCKET" not in env_of_child
            assert "WATCHDOG_USEC" not in env_of_child
        proc.send_signal(signal.SIGHUP)
        reloading = systemd.read_until("RELOADING", "1")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        assert systemd.read_until("READY", "1")
        proc.send_signal(signal.SIGTERM)
        stopping = systemd.read_until("STOPPING", "1")
        assert stopping["STATUS"].startswith("stopping:")
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        systemd.close()


def test_sighup_with_a_broken_config_keeps_the_running_one(tmp_path: Path) -> None:
    config = tmp_path / "fleetd.toml"
    example = Path(__file__).resolve().parents[2] / "etc" / "fleetd.toml"
    config.write_text(example.read_text())
    systemd = FakeSystemd(tmp_path / "notify.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetd", "demo", "--config", str(config),
         "--dir", str(tmp_path / "demo"), "--load-s", "0.3", "--gateway-port", "0"],
        env={**os.environ, "NOTIFY_SOCKET": str(systemd.path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        systemd.read_until("READY", "1")
        config.write_text(config.read_text().replace("vram_gib = 14.0", "vram_gib = -1"))
        proc.send_signal(signal.SIGHUP)
        systemd.read_until("RELOADING", "1")
        systemd.read_until("READY", "1")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        systemd.close()
    assert proc.returncode == 0
    assert "config.reload_failed" in out
    assert "keeping the running config" in out
    assert "models[0](mimo-vl).vram_gib = -1" in out
