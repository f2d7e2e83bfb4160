"""``fleetd run`` (real GPUs) and ``fleetd demo`` (the example fleet on a simulated host).

The demo rewrites the config for a sandbox: state and logs under one directory, engines
replaced by the emulators in ``fleetd.sim`` (started exactly as real engines would be, with
the simulated host named in their environment), GPUs observed through the simulated backend.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from fleetd import config
from fleetd.obs import logging as fleetd_logging

if TYPE_CHECKING:
    import argparse

    from fleetd.daemon import Daemon


def default_config_path() -> Path:
    """The example config: shipped in the wheel, or etc/fleetd.toml in a source checkout."""
    shipped = resources.files("fleetd").joinpath("examples/fleetd.toml")
    if shipped.is_file():
        return Path(str(shipped))
    return Path(__file__).resolve().parents[2] / "etc" / "fleetd.toml"


def main(args: argparse.Namespace) -> int:
    """Dispatch ``run`` / ``demo``."""
    if args.command == "run":
        cfg = config.load_config(args.config)
        fleetd_logging.configure(cfg.daemon.log_format)
        return asyncio.run(_run_real(cfg, args.config.absolute()))
    return asyncio.run(_run_demo(args))


async def _run_real(cfg: config.FleetConfig, path: Path) -> int:
    source = str(path)
    from fleetd.daemon import run_daemon  # noqa: PLC0415
    from fleetd.runtime.nvml import NvmlBackend  # noqa: PLC0415

    backend = await NvmlBackend.open()
    return await run_daemon(
        cfg,
        backend=backend,
        config_loader=lambda: config.load_config(path),
        config_path=source,
    )


def demo_config(
    cfg: config.FleetConfig, root: Path, *, emulate: bool = True, gateway_port: int | None = None
) -> config.FleetConfig:
    """The config rewritten for the sandbox in ``root`` (emulated engines, local state)."""
    python = sys.executable
    engines = (
        cfg.engines
        if not emulate
        else cfg.engines.model_copy(
            update={
                "vllm": cfg.engines.vllm.model_copy(
                    update={"command": (python, "-m", "fleetd.sim.vllm")}
                ),
                "ollama": cfg.engines.ollama.model_copy(
                    update={"command": (python, "-m", "fleetd.sim.ollama")}
                ),
            }
        )
    )
    daemon = cfg.daemon.model_copy(
        update={"state_dir": root / "state", "log_dir": root / "logs", "resync_interval_s": 5.0}
    )
    control = cfg.control.model_copy(
        update={"socket_path": root / "control.sock", "socket_group": None}
    )
    # an ephemeral port, so demos and tests never collide; the banner prints it
    metrics = cfg.metrics.model_copy(update={"port": 0})
    gateway = (
        cfg.gateway
        if gateway_port is None
        else cfg.gateway.model_copy(update={"port": gateway_port})
    )
    return cfg.model_copy(
        update={
            "engines": engines,
            "daemon": daemon,
            "control": control,
            "metrics": metrics,
            "gateway": gateway,
        }
    )


async def _run_demo(args: argparse.Namespace) -> int:
    from fleetd.daemon import run_daemon  # noqa: PLC0415
    from fleetd.sim.common import ENV_LOAD_S  # noqa: PLC0415
    from fleetd.sim.gpu import SimulatedGpuBackend  # noqa: PLC0415
    from fleetd.sim.host import ENV_SIM_DIR, SimHost  # noqa: PLC0415

    source = args.config or default_config_path()
    base = config.load_config(source)
    root = (args.dir or Path(tempfile.gettempdir()) / f"fleetd-demo-{os.getuid()}").resolve()
    cfg = demo_config(base, root, emulate=not args.real_engines, gateway_port=args.gateway_port)
    fleetd_logging.configure(cfg.daemon.log_format)
    sim_dir = root / "sim"
    gpus = [(g.name, g.total_mib, g.reserved_mib) for g in cfg.simulation.gpus]
    host = SimHost.open_or_create(sim_dir, gpus)
    env = {**os.environ, ENV_SIM_DIR: str(sim_dir), ENV_LOAD_S: str(args.load_s)}

    async def banner(daemon: Daemon) -> None:
        gateway = daemon.gateway
        gateway_url = (
            f"http://{daemon.cfg.gateway.host}:{gateway.port}/v1" if gateway is not None else ""
        )
        print(_banner(source, root, daemon.metrics_url, gateway_url), flush=True)
        if args.duration is not None:
            await asyncio.sleep(args.duration)
            daemon.request_stop()

    return await run_daemon(
        cfg,
        backend=SimulatedGpuBackend(host),
        engine_env=env,
        on_started=banner,
        config_loader=lambda: demo_config(
            config.load_config(source),
            root,
            emulate=not args.real_engines,
            gateway_port=args.gateway_port,
        ),
        config_path=str(source),
    )


def _banner(source: Path, root: Path, metrics_url: str, gateway_url: str) -> str:
    return "\n".join(
        [
            "",
            f"fleetd demo: the fleet of {source}",
            "  on a simulated host with emulated engines, loopback only",
            f"  engine logs      {root / 'logs'}",
            f"  worker records   {root / 'state' / 'workers'}",
            f"  simulated GPUs   {root / 'sim'}  (faults: see docs/demo.md)",
            f"  control socket   {root / 'control.sock'}",
            f"     export FLEETD_SOCKET={root / 'control.sock'}; fleetctl status",
            f"  metrics          {metrics_url or '(disabled)'}",
            f"  gateway          {gateway_url or '(disabled)'}  (OpenAI API; Ollama API at /api)",
            f"     curl {gateway_url or 'http://127.0.0.1:8000/v1'}/models",
            "  try: kill -9 a worker's pid (see the events below) and watch it come back;",
            f"       fleetd plan {source} --simulate --lost 0   # what if gpu0 dies?",
            "  stop: Ctrl-C (engines are stopped; nothing is left running)",
            "",
        ]
    )
