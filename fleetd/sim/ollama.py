"""An Ollama server emulator: ``python -m fleetd.sim.ollama serve`` behaves like ``ollama serve``.

fleetd runs one ``ollama serve`` per GPU and places several models in it; on machines with no
Ollama and no GPU this emulator stands in for it, against the simulated host of
``fleetd.sim.host``. It copies what a supervisor can observe of Ollama v0.33.0
(shared/reference/engines-nvml-systemd.md §B, checked against ollama/ollama at fb30760):
its environment, its HTTP API, its runner child processes and whose pid holds the VRAM,
its scheduler (keep-alive, eviction, partial offload) and how it dies. It must not be imported
by the real daemon path; it is a separate program.

Modules: ``ollama_env`` (settings), ``ollama_models`` (library and memory arithmetic),
``ollama_sched`` (runners), ``ollama_http`` (what the routes share), ``ollama_api`` (/api) and
``ollama_openai`` (/v1), ``ollama_server`` (composition, signals, faults), ``ollama_runner``
(the child that holds VRAM). Run by hand::

    python - <<'EOF'
    from pathlib import Path
    from fleetd.sim.host import SimHost
    SimHost.create(Path("/tmp/sim"), [("RTX 4090", 24564, 0)])
    EOF
    FLEETD_SIM_DIR=/tmp/sim CUDA_VISIBLE_DEVICES=0 python -m fleetd.sim.ollama serve
    curl localhost:11434/api/generate -d '{"model": "deepcoder:14b", "keep_alive": -1}'
    curl localhost:11434/api/ps

Environment (invalid integers are logged and replaced by the default, as Ollama does):

- ``OLLAMA_HOST``: ``[scheme://]host[:port][/path]``; default 127.0.0.1:11434, a bare host gets
  11434, ``http://`` 80, ``https://`` 443. Port 0 picks a free port (the log line says which).
- ``OLLAMA_KEEP_ALIVE``: Go duration (5m, 24h) or integer seconds; < 0 forever, 0 unload
  after each request; default 5m. A request's ``keep_alive`` overrides it.
- ``OLLAMA_MAX_LOADED_MODELS`` (0 = 3 per visible GPU, 3 on CPU), ``OLLAMA_NUM_PARALLEL``
  (default 1; embedding models always 1), ``OLLAMA_MAX_QUEUE`` (512), ``OLLAMA_GPU_OVERHEAD``
  (bytes kept free per GPU), ``OLLAMA_CONTEXT_LENGTH`` (0 = from total VRAM: 262144 from
  47 GiB, 32768 from 23 GiB, else 4096; capped at the model's trained context, at least 2048
  for vision models), ``OLLAMA_DEBUG``.
- ``CUDA_VISIBLE_DEVICES``: simulated GPUs by index or UUID; unset = all; enumeration stops at
  the first invalid id, so ``-1`` means CPU only (every model loads with size_vram 0).
- ``FLEETD_SIM_DIR`` (the simulated host; unset = CPU only), ``FLEETD_SIM_LOAD_S`` (load time,
  default 1 s), ``FLEETD_SIM_TOKEN_S`` (0.01 s per generated token), ``FLEETD_SIM_FAULTS``
  (``fleetd.sim.common.Faults``), ``FLEETD_SIM_OLLAMA_MODELS`` (see ``ollama_models``).

Faults: ``crash_after_s`` and SIGUSR2 exit 1 at once like a Go panic, leaving the runners
running; ``hang_after_s`` and SIGUSR1 make every new request and every stream wait forever
(SIGTERM still works); ``exit_on_load`` makes each runner fail after its load time, so the
request gets 500 ``llama-server process has terminated: exit status 1: error loading model:
...``; ``leak_mib_per_s`` makes ready runners grow their VRAM claim (/api/ps keeps showing the
prediction, as Ollama does) until the GPU is full and the runner dies of a CUDA OOM;
``slow_start_s`` adds to every load.

SIGTERM/SIGINT: listeners and connections close at once (in-flight streams are cut, not
drained), every runner is killed (SIGKILL), exit 0. SIGKILL of serve leaves the runners alive
in serve's process group; a supervisor kills the group.

Where Ollama's behaviour was not followed exactly, or the reference was silent (guesses):

- Runners are ``python -m fleetd.sim.ollama runner --model ... --ctx-size ... --n-gpu-layers
  ... --vram-mib ...``, not ``llama-server``; they claim their whole VRAM when they start (a
  real one allocates during the load), print ``ready`` on stdout when loaded (instead of
  answering /health) and never answer HTTP: text is generated in serve.
- Load time is FLEETD_SIM_LOAD_S + slow_start_s whatever the model size (not scaled).
- Memory: weights (the download size) + f16 KV cache (per-model bytes/token * num_ctx *
  num_parallel) + a compute graph of 2 % of the weights (at least 64 MiB). A first model loads
  fully if that fits in the free VRAM (min of driver and own accounting, less
  OLLAMA_GPU_OVERHEAD and CUDA's 457 MiB minimum), else as many whole layers as fit. A model
  loaded beside others must fit in 80 % of the free VRAM or an idle model is evicted first
  (sched.go's pre-flight check). ``options.num_gpu`` caps the GPU layers (0 = CPU); a
  num_gpu larger than what fits loads only what fits (llama-server would die of OOM). With
  several visible GPUs a model goes on one GPU (best fit); it is never split across GPUs.
  Host RAM is assumed sufficient.
- Eviction picks the idle runner with the shortest keep-alive duration, then by name
  (sched.go ``ByDurationAndName``; the reference words it as "shortest remaining").
- A request with different explicit ``num_gpu``/``num_ctx`` reloads the model, as
  ``needsReload`` does; a request without options never does.
- Once a model is being unloaded, new requests for it wait and load it again (Ollama may reuse
  the dying runner for a request that arrives in that window).
- OLLAMA_MAX_QUEUE counts requests waiting for a load or for a parallel slot; past it they
  get 503 ``server busy, please try again.  maximum pending requests exceeded``. (Ollama's
  queue only holds requests for models that are not loaded; its runner queues the rest.)
- Replies are 16-31 fake words ending with done_reason "stop"; with ``options.num_predict``
  (or /v1 ``max_tokens``) exactly that many, done_reason "length". Thinking models do not
  emit a ``thinking`` field. Prompt tokens are counted as words.
- Images to a model without the vision capability: 400 ``this model is missing data required
  for image input`` (the wording of Ollama's pre-0.30 runner; v0.33 has no such check before
  the runner). /api/embed and /v1/embeddings on a model without the embedding capability:
  400 ``this model does not support embeddings`` (also the old runner's wording; v0.33 lets
  the runner try). Chat/generate on an embedding-only model: 400 ``"x" does not support
  chat`` / ``generate`` (as v0.33). So an embedding model is preloaded with an empty
  /api/embed, not /api/generate, exactly as with real Ollama.
- Bad JSON: 400 with a Go-like message (``invalid character 'x' looking for beginning of
  value``, ``unexpected EOF``), not always Go's exact text.
- Digests of models other than llama3.2 are made up (sha256 of the name); modified_at is a
  fixed date. /api/show returns only license, modelfile, parameters, template, details,
  model_info (architecture, parameter_count, block_count, context_length, embedding_length),
  capabilities and modified_at. /api/pull, /api/create, /api/delete and /api/embeddings are
  not emulated: every catalogue model counts as pulled.
- A client that disconnects while the model it asked for is loading aborts the load, as in
  Ollama; requests cut by a disconnect are logged with status 499. Unknown routes answer
  gin's ``404 page not found``. Invalid base64 in ``images`` gives 400 ``illegal base64 data
  in images`` (Go's JSON decoder words it differently). Per-architecture limits on
  OLLAMA_NUM_PARALLEL (qwen3vl, mllama, ...) are not emulated.
- A runner that dies by itself stays in /api/ps until its keep-alive ends or a request finds it
  dead and reloads it (Ollama only notices on its next Ping), while its VRAM is free at once.
"""

from __future__ import annotations

import sys

from fleetd.sim.ollama_env import VERSION


def main(argv: list[str] | None = None) -> int:
    """``serve`` or ``runner`` (the child serve starts), like the ``ollama`` binary."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in {"-h", "--help", "help"}:
        sys.stdout.write("Usage:\n  python -m fleetd.sim.ollama serve\n")
        return 0 if args else 1
    if args[0] in {"-v", "--version"}:
        sys.stdout.write(f"ollama version is {VERSION}\n")
        return 0
    if args[0] == "serve":
        from fleetd.sim import ollama_server  # noqa: PLC0415 - runners must not import aiohttp

        return ollama_server.main(args[1:])
    if args[0] == "runner":
        from fleetd.sim import ollama_runner  # noqa: PLC0415 - keeps runner start-up fast

        return ollama_runner.main(args[1:])
    sys.stderr.write(f'Error: unknown command "{args[0]}" for "ollama"\n')
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
