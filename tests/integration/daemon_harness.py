"""Run the real daemon in-process against the simulated host with the real emulators.

Everything below the daemon is real: processes (posix_spawn, pidfd, process groups), HTTP
probes over loopback, the simulated host's files. Only the GPUs are simulated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from fleetd import config
from fleetd.daemon import Daemon, run_daemon
from fleetd.model.worker import WorkerState, WorkerStatus
from fleetd.obs.events import Event, Subscription
from fleetd.reconciler import Reconciler
from fleetd.sim.common import ENV_LOAD_S
from fleetd.sim.gpu import SimulatedGpuBackend
from fleetd.sim.host import ENV_SIM_DIR, SimHost

FAST_HEALTH = {
    "start_timeout_s": 20,
    "probe_interval_s": 0.2,
    "probe_timeout_s": 0.2,
    "unhealthy_after": 3,
    "stop_grace_s": 3,
    "drain_timeout_s": 5,
    "backoff_initial_s": 0.2,
    "backoff_max_s": 1.0,
    "max_restarts": 4,
    "restart_window_s": 60,
}


def fleet_toml(
    root: Path,
    models: str,
    *,
    vllm_env: str = "",
    ports: int = 0,
    vllm_command: str | list[str] = "",
    gateway: str = "",
) -> str:
    """A config for a test fleet: emulated engines, fast health settings, state under root."""
    python = sys.executable
    if isinstance(vllm_command, str):
        vllm_command = [vllm_command] if vllm_command else [python, "-m", "fleetd.sim.vllm"]
    vllm_argv = json.dumps(vllm_command)
    health = "\n".join(f"{k} = {v}" for k, v in FAST_HEALTH.items())
    base = 20000 + (os.getpid() % 200) * 100 + ports
    return f"""
[daemon]
state_dir = "{root / "state"}"
log_dir = "{root / "logs"}"
log_format = "json"
resync_interval_s = 1.0

[engines.vllm]
command = {vllm_argv}
ports = {{ first = {base}, last = {base + 39} }}
{vllm_env}

[engines.ollama]
command = ["{python}", "-m", "fleetd.sim.ollama"]
ports = {{ first = {base + 40}, last = {base + 79} }}

[gateway]
{gateway if "port" in gateway else "port = 0" + chr(10) + gateway}

[control]
socket_path = "{root / "control.sock"}"

[metrics]
port = 0

[[simulation.gpus]]
name = "sim A"
total_mib = 16384

[[simulation.gpus]]
name = "sim B"
total_mib = 16384

{models.replace("HEALTH", health)}
"""


@dataclass
class Fleet:
    """A running daemon and the world around it."""

    root: Path
    host: SimHost
    daemon: Daemon
    events: Subscription
    seen: list[Event]

    @property
    def socket(self) -> Path:
        return self.root / "control.sock"

    @property
    def reconciler(self) -> Reconciler:
        return self.daemon.reconciler

    def status(self, name: str) -> WorkerStatus:
        for status in self.reconciler.workers():
            if status.name == name:
                return status
        raise KeyError(f"{name} not among {[s.name for s in self.reconciler.workers()]}")

    async def wait_until(
        self, what: str, predicate: Callable[[], bool], *, timeout_s: float = 30.0
    ) -> None:
        """Wait for a condition, re-checking after every event (and at least every 0.1 s)."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                states = {s.name: f"{s.state}: {s.reason}" for s in self.reconciler.workers()}
                raise AssertionError(f"timed out waiting for {what}; workers: {states}")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(0.1, remaining)):
                    self.seen.append(await self.events.get())
            self.drain_events()

    def drain_events(self) -> None:
        while (event := self.events.get_nowait()) is not None:
            self.seen.append(event)

    async def wait_state(
        self, name: str, *states: WorkerState, timeout_s: float = 30.0
    ) -> WorkerStatus:
        await self.wait_until(
            f"{name} in {[s.value for s in states]}",
            lambda: _has(self, name) and self.status(name).state in states,
            timeout_s=timeout_s,
        )
        return self.status(name)

    def kinds(self, worker: str) -> list[str]:
        self.drain_events()
        return [
            f"{e.kind}:{e.fields.get('new', '')}"
            for e in self.seen
            if e.fields.get("worker") == worker
        ]


def _has(fleet: Fleet, name: str) -> bool:
    return any(s.name == name for s in fleet.reconciler.workers())


@contextlib.asynccontextmanager
async def running_fleet(
    root: Path,
    models: str,
    *,
    vllm_env: str = "",
    load_s: float = 0.3,
    engine_env: dict[str, str] | None = None,
    **cfg_kw: Any,
) -> AsyncIterator[Fleet]:
    """Start the daemon on a fresh simulated host; stop it (and check nothing is left)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "fleetd.toml"
    path.write_text(fleet_toml(root, models, vllm_env=vllm_env, **cfg_kw))
    cfg = config.load_config(path)
    host = SimHost.create(
        root / "sim", [(g.name, g.total_mib, g.reserved_mib) for g in cfg.simulation.gpus]
    )
    env = {
        **os.environ,
        ENV_SIM_DIR: str(host.root),
        ENV_LOAD_S: str(load_s),
        "FLEETD_SIM_TOKEN_S": "0.002",
        **(engine_env or {}),
    }
    started: asyncio.Future[Daemon] = asyncio.get_running_loop().create_future()

    async def on_started(daemon: Daemon) -> None:
        started.set_result(daemon)

    task = asyncio.create_task(
        run_daemon(
            cfg,
            backend=SimulatedGpuBackend(host),
            engine_env=env,
            on_started=on_started,
            install_signals=False,
            config_loader=lambda: config.load_config(path),
            config_path=str(path),
        )
    )
    daemon = await asyncio.wait_for(started, 10)
    fleet = Fleet(root, host, daemon, daemon.bus.subscribe(), [])
    try:
        yield fleet
    finally:
        daemon.request_stop()
        code = await asyncio.wait_for(task, 60)
        assert code == 0, f"daemon exited with {code}"
        leftovers = _engine_processes(root)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not leftovers, f"engine processes left running after fleetd stopped: {leftovers}"


def _engine_processes(root: Path) -> list[int]:
    """Processes whose environment names this test's simulated host (emulators, runners)."""
    marker = str(root / "sim")
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get(ENV_SIM_DIR) == marker and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def gpu_claims(fleet: Fleet) -> dict[int, int]:
    """MiB claimed per GPU index on the simulated host right now."""
    out: dict[int, int] = {}
    uuids = {g.uuid: g.index for g in fleet.host.gpus()}
    for claim in fleet.host.claims():
        out[uuids[claim.uuid]] = out.get(uuids[claim.uuid], 0) + claim.used_mib
    return out
