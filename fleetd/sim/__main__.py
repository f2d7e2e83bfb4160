"""``python -m fleetd.sim DIR COMMAND``: inject faults into a running simulated host.

Used with ``fleetd demo`` (its banner prints the simulated host's directory) to watch fleetd
react, exactly as a test would:

    python -m fleetd.sim /tmp/fleetd-demo-0/sim status
    python -m fleetd.sim /tmp/fleetd-demo-0/sim lose 0        # gpu0 falls off the bus
    python -m fleetd.sim /tmp/fleetd-demo-0/sim xid 1 13      # an application XID on gpu1
    python -m fleetd.sim /tmp/fleetd-demo-0/sim ecc 1 2       # 2 uncorrectable ECC errors
    python -m fleetd.sim /tmp/fleetd-demo-0/sim foreign 1 512 # a foreign process takes 512 MiB
    python -m fleetd.sim /tmp/fleetd-demo-0/sim heal 0        # as after a GPU reset
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fleetd.sim.host import SimHost, SimHostError


def main(argv: list[str] | None = None) -> int:
    """Parse and apply one command."""
    parser = argparse.ArgumentParser(prog="python -m fleetd.sim", description=__doc__)
    parser.add_argument("dir", type=Path, help="the simulated host's directory")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="GPUs, live memory claims and faults")
    lose = sub.add_parser("lose", help="the GPU is lost (fell off the bus)")
    lose.add_argument("gpu")
    heal = sub.add_parser("heal", help="clear every fault of a GPU (as a reset does)")
    heal.add_argument("gpu")
    xid = sub.add_parser("xid", help="the driver reports an XID on a GPU")
    xid.add_argument("gpu")
    xid.add_argument("xid", type=int)
    ecc = sub.add_parser("ecc", help="set the uncorrectable ECC error count of a GPU")
    ecc.add_argument("gpu")
    ecc.add_argument("count", type=int)
    foreign = sub.add_parser("foreign", help="a process fleetd does not own holds MiB on a GPU")
    foreign.add_argument("gpu")
    foreign.add_argument("mib", type=int)
    foreign.add_argument("--pid", type=int, default=4242)
    args = parser.parse_args(argv)
    host = SimHost(args.dir)
    try:
        return _apply(host, args)
    except SimHostError as exc:
        sys.stderr.write(f"fleetd.sim: {exc}\n")
        return 1


def _apply(host: SimHost, args: argparse.Namespace) -> int:
    if args.command == "status":
        faults = host.faults()
        claims = host.claims()
        for gpu in host.gpus():
            used = sum(c.used_mib for c in claims if c.uuid == gpu.uuid)
            sys.stdout.write(
                f"gpu{gpu.index} {gpu.uuid} {gpu.name}: {used}/{gpu.total_mib} MiB used"
                f"{' faults=' + str(faults[gpu.uuid]) if gpu.uuid in faults else ''}\n"
            )
            for claim in claims:
                if claim.uuid == gpu.uuid:
                    sys.stdout.write(
                        f"  pid {claim.pid} {claim.name or '?'} {claim.used_mib} MiB\n"
                    )
        return 0
    if args.command == "lose":
        host.set_fault(args.gpu, lost=True)
    elif args.command == "heal":
        host.clear_faults(args.gpu)
    elif args.command == "xid":
        host.inject_xid(args.gpu, args.xid)
    elif args.command == "ecc":
        host.set_fault(args.gpu, ecc_uncorrected=args.count)
    elif args.command == "foreign":
        host.claim(
            args.gpu, args.mib, pid=args.pid, name="foreign", persistent=True, check_free=False
        )
    sys.stdout.write(f"ok: {args.command} {args.gpu}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
