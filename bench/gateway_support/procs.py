"""Every process the benchmark starts, and a certain end for all of them.

``Procs`` is a registry and a context manager: whatever was started through it is stopped
when the ``with`` block ends, however it ends (an error, Ctrl-C, SIGTERM turned into
SystemExit by ``exit_on_sigterm``). A stop is SIGTERM (to the process group where the
process leads one), a grace period, SIGKILL, and then SIGKILL to every descendant seen
before the stop that is still alive: fleetd's engines run in sessions of their own, so only
this catches them if fleetd itself had to be killed.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

import psutil

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence
    from pathlib import Path
    from types import FrameType, TracebackType


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_block(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports below the ephemeral range.

    Below it, so that no client connection of the load generator takes one of them as its
    local port while fleetd has not bound it yet.
    """
    for _ in range(200):
        base = random.randrange(20000, 32000 - count)
        if all(port_is_free(p) for p in range(base, base + count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports between 20000 and 32000")


def wait_until(
    what: str, pred: Callable[[], bool], *, timeout_s: float, interval_s: float = 0.05
) -> float:
    """Seconds until ``pred()`` is true; TimeoutError naming ``what`` after ``timeout_s``."""
    start = time.monotonic()
    while True:
        if pred():
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds used so far by these processes (gone ones count 0)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


def tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        return []


@dataclass
class Managed:
    """One started process and how to stop it."""

    name: str
    proc: subprocess.Popen[bytes]
    group: bool  # it leads its own session: signal the whole process group
    grace_s: float


class Procs:
    """Processes started for the run; all stopped on ``close`` or at the end of ``with``."""

    def __init__(self) -> None:
        self._managed: list[Managed] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log: Path | None = None,
        env: Mapping[str, str] | None = None,
        pipe_stdout: bool = False,
        group: bool = True,
        grace_s: float = 5.0,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv``: output to ``log`` (or a pipe, or nowhere), in its own session."""
        stdout: int | None = subprocess.DEVNULL
        sink = None
        if pipe_stdout:
            stdout = subprocess.PIPE
        elif log is not None:
            sink = log.open("ab")
            stdout = sink.fileno()
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.STDOUT if (pipe_stdout or sink) else subprocess.DEVNULL,
                env=dict(env) if env is not None else None,
                start_new_session=group,
            )
        finally:
            if sink is not None:
                sink.close()  # the child has its own descriptor
        self._managed.append(Managed(name, proc, group, grace_s))
        return proc

    def forget(self, proc: subprocess.Popen[bytes]) -> None:
        """``proc`` has ended by itself (and was waited for): nothing left to stop."""
        self._managed = [m for m in self._managed if m.proc is not proc]

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """Stop one process now (SIGTERM, grace, SIGKILL, leftovers)."""
        for managed in [m for m in self._managed if m.proc is proc]:
            _terminate(managed)
        self.forget(proc)

    def close(self) -> None:
        """Stop everything, newest first; Ctrl-C and SIGTERM wait until this is done."""
        previous = {
            sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            while self._managed:
                managed = self._managed.pop()
                try:
                    _terminate(managed)
                except Exception as exc:  # noqa: BLE001 - go on with the others, say why
                    print(f"warning: stopping {managed.name} (pid {managed.proc.pid}): {exc!r}")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _send(managed: Managed, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if managed.group:
            os.killpg(managed.proc.pid, sig)
        else:
            managed.proc.send_signal(sig)


def _terminate(managed: Managed) -> None:
    proc = managed.proc
    try:
        seen = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        seen = []
    if proc.poll() is None:
        _send(managed, signal.SIGTERM)
        try:
            proc.wait(managed.grace_s)
        except subprocess.TimeoutExpired:
            _send(managed, signal.SIGKILL)
            proc.kill()
            proc.wait(10)
    if managed.group:  # whatever is left of its group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    alive = [p for p in seen if p.is_running()]
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(alive, timeout=5)
    if proc.stdout is not None:
        proc.stdout.close()


def exit_on_sigterm() -> None:
    """SIGTERM ends the run like Ctrl-C does: through every ``finally`` and ``with``."""

    def handler(signum: int, frame: FrameType | None) -> None:  # noqa: ARG001 - signal API
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
