"""Starting, watching and stopping engine processes so that they can outlive fleetd.

Engines (DESIGN decision 3) run in their own session and process group, with stdin from
/dev/null and stdout+stderr appended to a per-worker log file — never a pipe held by fleetd —
so a fleetd restart does not kill or block them. ``posix_spawnp`` with ``setsid`` starts them
(no ``preexec_fn``); a pidfd tells us the moment one exits (no polling loop), for processes we
started and for processes a previous fleetd started and we adopted.

Stopping is a ladder over the whole process group (vLLM's EngineCore and workers included):
SIGTERM, wait up to the grace period, SIGKILL, then make sure no member of the group is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import psutil

from fleetd.errors import FleetdError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

    from fleetd.runtime.clock import Clock


class EngineStartError(FleetdError):
    """The engine process could not be started at all (binary missing, not executable, ...)."""


class ProcessHandle(Protocol):
    """A running (or exited) engine process."""

    pid: int
    create_time: float

    async def wait(self) -> int | None:
        """Wait for the exit; the exit code, or None when it is unknown (adopted process)."""
        ...

    def exited(self) -> bool:
        """Whether the process has exited (and been noticed)."""
        ...

    def signal_group(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the whole process group."""
        ...

    def group_pids(self) -> list[int]:
        """Live pids in the process group (the leader and every descendant that stayed)."""
        ...


class Launcher(Protocol):
    """Starts engine processes and re-attaches to ones started before."""

    def spawn(
        self, argv: Sequence[str], *, env: Mapping[str, str], log_path: Path
    ) -> ProcessHandle:
        """Start ``argv`` in a new session with output appended to ``log_path``."""
        ...

    def adopt(self, pid: int, create_time: float) -> ProcessHandle | None:
        """Attach to a live process from an earlier fleetd, or None if it is gone or reused."""
        ...


def group_members(pgid: int) -> list[int]:
    """Every live, non-zombie process whose process group is ``pgid``."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return sorted(members)


class PosixProcess:
    """A process watched through a pidfd; reaped by us when it is our child."""

    def __init__(self, pid: int, create_time: float, *, child: bool) -> None:
        self.pid = pid
        self.create_time = create_time
        self._child = child
        self._pidfd = os.pidfd_open(pid)
        self._exit: asyncio.Future[int | None] | None = None

    def _watch(self) -> asyncio.Future[int | None]:
        if self._exit is None:
            loop = asyncio.get_running_loop()
            self._exit = loop.create_future()
            loop.add_reader(self._pidfd, self._on_exit)
        return self._exit

    def _on_exit(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        code: int | None = None
        if self._child:
            with contextlib.suppress(ChildProcessError):
                _, status = os.waitpid(self.pid, 0)
                code = os.waitstatus_to_exitcode(status)
        if self._exit is not None and not self._exit.done():
            self._exit.set_result(code)

    async def wait(self) -> int | None:
        """Wait for the exit (several waiters share one pidfd)."""
        return await asyncio.shield(self._watch())

    def exited(self) -> bool:
        """Whether the exit has been observed."""
        return self._exit is not None and self._exit.done()

    def signal_group(self, sig: signal.Signals) -> None:
        """Signal the group; a group that is already gone is not an error."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    def group_pids(self) -> list[int]:
        """Live members of the group (setsid made the pid the group id)."""
        return group_members(self.pid)

    def close(self) -> None:
        """Stop watching without waiting (used when fleetd exits and leaves engines running)."""
        if self._pidfd >= 0:
            with contextlib.suppress(RuntimeError, ValueError):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if self._exit is not None and not self._exit.done():
            self._exit.cancel()


class PosixLauncher:
    """The real launcher."""

    def spawn(self, argv: Sequence[str], *, env: Mapping[str, str], log_path: Path) -> PosixProcess:
        """posix_spawnp in a new session; output appended to the log file."""
        if not argv:
            raise EngineStartError("empty command")
        exe = argv[0]
        if os.sep not in exe and shutil.which(exe, path=env.get("PATH")) is None:
            raise EngineStartError(
                f"engine command {exe!r} not found on PATH; set an absolute path in "
                "[engines.<engine>].command"
            )
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            pid = os.posix_spawnp(
                exe,
                list(argv),
                dict(env),
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, log_fd, 1),
                    (os.POSIX_SPAWN_DUP2, log_fd, 2),
                ],
                setsid=True,
            )
        except FileNotFoundError:
            raise EngineStartError(f"engine command {exe!r} does not exist") from None
        except PermissionError:
            raise EngineStartError(f"engine command {exe!r} is not executable") from None
        finally:
            os.close(log_fd)
        try:
            create_time = psutil.Process(pid).create_time()
        except psutil.Error:
            create_time = 0.0
        return PosixProcess(pid, create_time, child=True)

    def adopt(self, pid: int, create_time: float) -> PosixProcess | None:
        """Attach to ``pid`` if it is alive, leads its own group and started at ``create_time``."""
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            if abs(proc.create_time() - create_time) > 0.05 or os.getpgid(pid) != pid:
                return None  # the pid was reused by an unrelated process
            return PosixProcess(pid, create_time, child=False)
        except (psutil.Error, ProcessLookupError, PermissionError):
            return None


@dataclass(frozen=True, slots=True)
class StopOutcome:
    """What the stop ladder had to do."""

    exit_code: int | None
    killed: bool  # the leader ignored SIGTERM for the whole grace period: SIGKILL
    swept: tuple[int, ...]  # group members still alive after the leader exited, then killed
    orphans: tuple[int, ...]  # pids of the group alive even after SIGKILL (should be empty)

    def describe(self) -> str:
        """Human summary, e.g. ``exit code 0; 2 leftover processes killed``."""
        text = "killed after the grace period" if self.killed else f"exit code {self.exit_code}"
        if self.swept:
            text += f"; {len(self.swept)} leftover process(es) of its group killed"
        return text


async def stop_group(
    handle: ProcessHandle, *, grace_s: float, clock: Clock | None = None
) -> StopOutcome:
    """SIGTERM the group, wait ``grace_s``, SIGKILL the group, and sweep what is left."""
    handle.signal_group(signal.SIGTERM)
    killed = False
    exit_task: asyncio.Future[int | None] = asyncio.ensure_future(handle.wait())
    grace: asyncio.Future[None] = asyncio.ensure_future(
        clock.sleep(grace_s) if clock is not None else asyncio.sleep(grace_s)
    )
    both: set[asyncio.Future[Any]] = {exit_task, grace}
    try:
        await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
    finally:
        grace.cancel()
    if not exit_task.done():
        killed = True
        handle.signal_group(signal.SIGKILL)
    code = await exit_task
    # the leader is gone; children that ignored SIGTERM or were slow may linger in the group
    swept = handle.group_pids()
    orphans: list[int] = []
    if swept:
        handle.signal_group(signal.SIGKILL)
        orphans = await wait_gone(swept, timeout_s=5.0)
    return StopOutcome(code, killed, tuple(swept), tuple(orphans))


async def wait_gone(pids: list[int], *, timeout_s: float) -> list[int]:
    """Wait until every pid has exited; a zombie counts as gone (its memory is already freed).

    These are not our children (their parent died), so no pidfd wait can reap them and
    ``psutil.wait_procs`` would wait for init to reap the zombie; a short bounded check
    every 20 ms is the honest way to watch them.
    """
    deadline = asyncio.get_running_loop().time() + timeout_s
    alive = list(pids)
    while alive:
        alive = [pid for pid in alive if _running(pid)]
        if not alive or asyncio.get_running_loop().time() >= deadline:
            break
        await asyncio.sleep(0.02)
    return alive


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def rotate_log(path: Path, *, max_bytes: int, keep: int = 3) -> bool:
    """Copy-truncate rotation: the engine keeps its O_APPEND fd and writes on at offset 0.

    Returns True when the file was rotated. ``path.1`` is the newest old copy.
    """
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    for i in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{i + 1}"))
    shutil.copyfile(path, path.with_name(f"{path.name}.1"))
    with path.open("r+b") as fh:
        fh.truncate(0)
    return True
