"""A faithful vLLM emulator: ``python -m fleetd.sim.vllm serve MODEL [flags]``.

fleetd's demo and most of its tests run where no GPU (and no vLLM) exists, yet the supervisor
must be proven against vLLM's real behaviour. This emulator reproduces what a supervisor can
observe of vLLM 0.33 (shared/reference/engines-nvml-systemd.md §A, vllm-on-cpu.md §3): the
command line (unknown flags exit 2), the process tree (the spawned pid is the API server; a
``VLLM::EngineCore`` child holds the GPU memory and is orphaned if only the API server is
SIGKILLed), "connection refused" while loading, the start-up refusal when free VRAM is below
``ceil(total * gpu_memory_utilization)``, the HTTP endpoints and SSE streams, Prometheus
metrics, sleep mode, SIGTERM in abort and drain modes, and engine-core death (503, then exit 0).

Memory is claimed on the simulated host in ``$FLEETD_SIM_DIR`` (``fleetd.sim.host``) on the GPU
named by ``CUDA_VISIBLE_DEVICES``. Environment knobs:

- ``FLEETD_SIM_DIR``, ``CUDA_VISIBLE_DEVICES``, ``FLEETD_SIM_LOAD_S``, ``FLEETD_SIM_FAULTS``
  (``crash_after_s``, ``hang_after_s``, ``exit_on_load``, ``leak_mib_per_s``,
  ``slow_start_s``): see ``fleetd.sim.common``. SIGUSR1 hangs the server, SIGUSR2 crashes it.
- ``FLEETD_SIM_TOKEN_S`` (0.01): seconds per generated token.
- ``FLEETD_SIM_SLEEP_S``: seconds a /sleep or /wake_up takes (default: 0.2 s plus the
  weights at 12 GiB/s over PCIe, about 1.4 s for a 7B bf16 model).
- ``FLEETD_SIM_DEAD_EXIT_S`` (3.0): engine core dead -> API server exits 0 after this long.
- ``FLEETD_SIM_WEIGHTS_MIB``, ``FLEETD_SIM_KV_KIB_PER_TOKEN``: the model's real sizes. By
  default both are estimated from the name (``...-7B...`` -> 7.7e9 bf16 parameters; no size in
  the name -> a 512 MiB test model with a 2048-token context) and then only shape the logs, the
  KV-cache gauge and sleep mode; given, they enable vLLM's size-dependent start-up refusals
  ("No available memory for the cache blocks", "To serve at least one request with the
  model's max seq len ...").
- vLLM's own: ``VLLM_API_KEY``, ``VLLM_SERVER_DEV_MODE`` (sleep routes),
  ``VLLM_KEEP_ALIVE_ON_ENGINE_DEATH``, ``VLLM_LOG_STATS_INTERVAL``.

Choices made where the references are silent:

- Sleep mode follows vLLM's source: the routes exist only with ``VLLM_SERVER_DEV_MODE=1``
  and, here, ``--enable-sleep-mode`` (otherwise 404). ``/sleep?level=N&mode=abort|wait|keep``
  pauses the scheduler like vLLM's ``pause_scheduler``: in-flight requests are aborted (the
  default ``abort``), awaited (``wait``) or frozen (``keep``); requests arriving while asleep
  are *queued* (counted in ``vllm:num_requests_waiting``) and run after ``/wake_up``, not
  refused with 503. While asleep the claim drops to min(5 % of it, 512 MiB); a wake-up that
  cannot re-claim its memory answers 500 and leaves the engine asleep.
- A hung server also ignores SIGTERM (only SIGKILL ends it), like the observed shutdown hangs.
- A SIGTERM to the whole process group (what fleetd and systemd send) reaches the engine core
  too; it then behaves like vLLM's ``run_engine_core`` handler (abort, or drain until the API
  server's requests are done), so ``--shutdown-timeout`` drains work with group signals.
  Drain mode exits as soon as requests are done (the real server may linger ~5 s more on
  keep-alive connections, vllm-on-cpu.md §3.6).
- Abort-mode SIGTERM always ends streams cleanly (``finish_reason: "abort"``, ``[DONE]``);
  the real server sometimes sent an error event instead and sometimes hung (5/16 trials).
- SIGTERM while loading exits by SIGINT (rc -2), as vLLM's uncaught
  ``KeyboardInterrupt("terminated")`` would.
- ``--gpu-memory-utilization`` outside (0, 1] is an argparse error (exit 2); real vLLM rejects
  it later through pydantic.
- Chat requests without ``max_tokens`` end with ``stop`` after 8-24 tokens; ``n`` > 1 and
  batched completion prompts are refused with 400.
"""

from __future__ import annotations

import os
import signal
import sys

from fleetd.sim import vllm_args

_USAGE = "usage: vllm [-h] [-v] {chat,complete,serve,bench,collect-env,run-batch} ..."


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``serve`` (the emulated ``vllm serve``) and ``engine-core`` (its child)."""
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else ""
    if command == "engine-core":
        from fleetd.sim import vllm_engine  # noqa: PLC0415 - the child needs no aiohttp

        return vllm_engine.main(argv[1:])
    if command == "serve":
        args = vllm_args.parse_serve_args(argv[1:])
        from fleetd.sim import vllm_server  # noqa: PLC0415 - keeps `engine-core` start fast

        code = vllm_server.run(args)
        if code == vllm_server.INTERRUPTED:  # die of SIGINT, as an uncaught KeyboardInterrupt
            sys.stdout.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        return code
    if command in {"-v", "--version"}:
        sys.stdout.write(f"{vllm_args.VERSION}\n")
        return 0
    sys.stderr.write(
        f"{_USAGE}\nvllm: error: argument subparser: invalid choice: {command!r} "
        "(choose from 'chat', 'complete', 'serve', 'bench', 'collect-env', 'run-batch')\n"
    )
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
