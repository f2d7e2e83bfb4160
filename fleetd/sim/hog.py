"""A process that holds memory on a simulated GPU until it is killed: a stand-in "foreign process".

``python -m fleetd.sim.hog --gpu 1 --mib 512`` claims 512 MiB on simulated gpu1 of the host in
$FLEETD_SIM_DIR, prints ``ready`` and sleeps; when it dies (any signal) the memory is free
again, exactly as the driver frees a dead process's allocations.
"""

from __future__ import annotations

import argparse
import signal
import sys

from fleetd.sim.host import SimHost, SimHostError


def main(argv: list[str] | None = None) -> int:
    """Claim, announce, wait for a signal."""
    parser = argparse.ArgumentParser(prog="python -m fleetd.sim.hog")
    parser.add_argument("--gpu", required=True, help="GPU index or UUID")
    parser.add_argument("--mib", type=int, required=True, help="memory to hold, MiB")
    parser.add_argument("--name", default="hog", help="process name shown in GPU process lists")
    args = parser.parse_args(argv)
    try:
        SimHost.from_env().claim(args.gpu, args.mib, name=args.name)
    except SimHostError as exc:
        print(f"hog: {exc}", file=sys.stderr)
        return 1
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})  # the claim dies with the process
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    raise SystemExit(main())
