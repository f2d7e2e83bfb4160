"""One Ollama model held in the ``ollama serve`` of its GPU: loaded, pinned, watched, unloaded.

Ollama runs one server per GPU (a ``ProcessWorker``) and each placed model is a slot in it,
with its own state and owner task. Loading is an empty-prompt /api/generate with
``keep_alive: -1`` (the model stays until told otherwise), verified in /api/ps; unloading is
``keep_alive: 0`` and waits until /api/ps no longer lists it. A planned unload first drains:
the slot leaves READY (the gateway stops routing to it) and waits, bounded by the model's
``drain_timeout_s``, until the gateway has no request in flight there; Ollama itself also
waits for a model's running requests before it expires the runner.

Loads take the GPU's lock (like vLLM starts) so that Ollama's own free-memory estimate is not
disturbed by a neighbour starting at the same moment, and partial offload is bounded by
``options.num_gpu`` so a model larger than its budget cannot take the whole card.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from fleetd.config import Capability
from fleetd.engines import ollama as adapter
from fleetd.gateway.inflight import Inflight, target_id
from fleetd.lifecycle import StateOwner
from fleetd.model import units
from fleetd.model.worker import ROUTABLE_STATES, WorkerState, WorkerStatus

if TYPE_CHECKING:
    from fleetd.config import ModelSpec
    from fleetd.obs.events import EventBus
    from fleetd.runtime.clock import Clock
    from fleetd.runtime.health import HttpProbe
    from fleetd.supervisor import GpuGate, ProcessWorker


class OllamaSlot(StateOwner):
    """A model replica inside an Ollama server. Run ``run()`` as its owner task."""

    def __init__(
        self,
        spec: ModelSpec,
        replica: int,
        *,
        serve: ProcessWorker,
        gate: GpuGate,
        probe: HttpProbe,
        clock: Clock,
        bus: EventBus,
        inflight: Inflight | None = None,
    ) -> None:
        name = spec.name if replica == 0 else f"{spec.name}#{replica}"
        super().__init__(
            name, kind="worker", clock=clock, bus=bus, engine="ollama", gpu=serve.spec.gpu_index
        )
        self.spec = spec
        self.replica = replica
        self.serve = serve
        self._gate = gate
        self._probe = probe
        self._tag = adapter.normalise(spec.model)
        self._want_loaded = False
        self._wake = asyncio.Event()
        self._reload = False
        self.restarts = 0
        self.vram_mib: int | None = None
        self._inflight = inflight or Inflight()
        self._failures = 0  # loads failed in a row
        # what the planner granted: the full budget, or less for a shrunk (offloaded) model;
        # a loaded model keeps the layers it was loaded with until it is loaded again
        self.budget_mib = spec.budget_mib
        self.target = target_id(name, serve.spec.gpu_uuid)

    @property
    def base_url(self) -> str:
        """The Ollama server's address."""
        return f"http://127.0.0.1:{self.serve.spec.port}"

    @property
    def wanted(self) -> bool:
        """Whether the model should be loaded."""
        return self._want_loaded

    def ensure_running(self) -> None:
        """Load the model (now, or as soon as the server is ready)."""
        self._want_loaded = True
        self._wake.set()

    def ensure_stopped(self) -> None:
        """Unload the model."""
        self._want_loaded = False
        self._wake.set()

    def restart(self) -> None:
        """Unload and load again (fleetctl restart); a FAILED slot gets a fresh start."""
        self._failures = 0
        self._reload = True
        self._want_loaded = True
        self._wake.set()

    def status(self) -> WorkerStatus:
        """A frozen view for readers."""
        return WorkerStatus(
            name=self.name,
            engine="ollama",
            gpu_uuid=self.serve.spec.gpu_uuid,
            gpu_index=self.serve.spec.gpu_index,
            state=self._state,
            reason=self._reason,
            port=self.serve.spec.port,
            pid=self.serve.pid,
            restarts=self.restarts,
            since_s=self._since,
            models=(self.spec.name,),
            budget_mib=self.budget_mib,
        )

    async def run(self) -> None:
        """The owner task: follows the wish and the server's health until cancelled."""
        health = self.spec.health
        while True:
            if not self._want_loaded:
                if self._state not in (WorkerState.STOPPED, WorkerState.FAILED):
                    await self._unload()
                await self._nap(None)
                continue
            if self.serve.state not in ROUTABLE_STATES:
                await self._server_down()
                await self._nap(0.25)
                continue
            if self._reload:  # fleetctl restart: unload (unless already out), then load again
                self._reload = False
                self.restarts += 1
                if self._state is not WorkerState.STOPPED:
                    await self._unload()
                continue
            if self._state in (WorkerState.STOPPED, WorkerState.BACKOFF):
                await self._load()
                continue
            if self._state is WorkerState.FAILED:
                await self._nap(None)
                continue
            await self._nap(health.probe_interval_s)
            await self._check_still_loaded()

    async def _nap(self, timeout_s: float | None) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._wake.wait()

    async def _server_down(self) -> None:
        if self._state in (WorkerState.STARTING, WorkerState.READY, WorkerState.DRAINING):
            await self._set_state(
                WorkerState.BACKOFF, f"its Ollama server is {self.serve.state}; will reload"
            )

    async def _load(self) -> None:
        spec = self.spec
        async with self._gate.lock:
            loaded = await self._loaded()
            if self._tag not in loaded:
                free_mib, holders = await self._gate.free_mib()
                if free_mib < self.budget_mib:
                    why = (
                        f"waiting for GPU memory: needs {self.budget_mib} MiB, "
                        f"gpu{self.serve.spec.gpu_index} has {free_mib} MiB free ({holders})"
                    )
                    if self._state is not WorkerState.BACKOFF:
                        await self._set_state(WorkerState.BACKOFF, why)
                    self._reason = why
                    await self._nap(spec.health.backoff_max_s)
                    return
            await self._set_state(WorkerState.STARTING, f"loading {self._tag} (keep_alive -1)")
            body = adapter.load_request(self._tag, num_gpu=await self._gpu_layers())
            # embedding models have no /api/generate; an /api/embed without input loads them
            path = "/api/embed" if Capability.EMBEDDINGS in spec.capabilities else "/api/generate"
            result = await self._probe.post_json(
                f"{self.base_url}{path}", body, timeout_s=spec.health.start_timeout_s
            )
            loaded = await self._loaded()
        if result.ok and self._tag in loaded:
            self._failures = 0
            size_mib, vram_mib = loaded[self._tag]
            self.vram_mib = vram_mib
            note = f"size {size_mib} MiB, {vram_mib} MiB in VRAM"
            if vram_mib < size_mib:
                note += f" (partial offload: {size_mib - vram_mib} MiB in system RAM)"
            await self._set_state(WorkerState.READY, f"loaded: {note}", vram_mib=vram_mib)
            if vram_mib > self.budget_mib:
                self._bus.emit(
                    "worker.over_budget",
                    f"{self.name}: {vram_mib} MiB in VRAM, budget {self.budget_mib} MiB",
                    worker=self.name,
                    vram_mib=vram_mib,
                    budget_mib=self.budget_mib,
                )
            return
        error = result.body.get("error") if isinstance(result.body, dict) else result.body
        self.restarts += 1
        why = f"load failed ({result.detail}): {error or 'not listed in /api/ps'}"
        if result.detail == "HTTP 404":
            await self._set_state(
                WorkerState.FAILED,
                f"{why}; pull it first: `ollama pull {self._tag}` on this host",
            )
            return
        if "does not support generate" in str(error):
            why += "; an embedding model: add 'embeddings' to its capabilities"
        await self._back_off(why)

    async def _back_off(self, why: str) -> None:
        """BACKOFF for a growing delay (reconcile nudges do not cut it short), or FAILED."""
        health = self.spec.health
        self._failures += 1
        if self._failures > health.max_restarts:
            await self._set_state(
                WorkerState.FAILED,
                f"{why}; {self._failures} loads failed in a row: fix it, then "
                f"`fleetctl restart {self.name}`",
            )
            return
        delay_s = min(health.backoff_max_s, health.backoff_initial_s * 2 ** (self._failures - 1))
        await self._set_state(WorkerState.BACKOFF, f"{why}; retry in {delay_s:.1f} s")
        deadline = self._clock.monotonic() + delay_s
        while self._want_loaded and not self._reload:
            left = deadline - self._clock.monotonic()
            if left <= 0:
                break
            await self._nap(left)

    async def _gpu_layers(self) -> int | None:
        """num_gpu that keeps a partially offloaded model inside its budget (None: all of it).

        Layers are sized from what Ollama says about the model (/api/tags size, /api/show
        block_count), not from the config, and only ``vram_gib`` goes to layers: the overhead
        part of the budget is left for the context and the CUDA context.
        """
        shrunk = self.budget_mib < self.spec.budget_mib  # the planner granted less: offload
        if not shrunk and (self.spec.size_gib is None or not self.spec.offloaded_mib):
            return None
        tags = await self._probe.get(f"{self.base_url}/api/tags", timeout_s=10.0, want_json=True)
        size_mib = adapter.tag_size_mib(tags.body, self._tag)
        shown = await self._probe.post_json(
            f"{self.base_url}/api/show", {"model": self._tag}, timeout_s=10.0
        )
        blocks = adapter.block_count(shown.body)
        if size_mib is None or blocks is None:
            return None  # Ollama will say what is wrong when it loads
        weights_mib = self.budget_mib - units.gib_to_mib(self.spec.overhead_gib)
        return adapter.gpu_layers(weights_mib, size_mib, blocks)

    async def _loaded(self) -> dict[str, tuple[int, int]]:
        result = await self._probe.get(
            f"{self.base_url}/api/ps", timeout_s=self.spec.health.probe_timeout_s, want_json=True
        )
        return adapter.loaded(result.body) if result.ok else {}

    async def _check_still_loaded(self) -> None:
        if self._state is not WorkerState.READY or self.serve.state not in ROUTABLE_STATES:
            return
        result = await self._probe.get(
            f"{self.base_url}/api/ps", timeout_s=self.spec.health.probe_timeout_s, want_json=True
        )
        if result.ok and self._tag not in adapter.loaded(result.body):
            self.restarts += 1
            self._bus.emit(
                "worker.crashed",
                f"{self.name}: no longer loaded in Ollama; reloading",
                worker=self.name,
            )
            await self._set_state(WorkerState.BACKOFF, "unloaded behind fleetd's back; reloading")

    async def _drain(self) -> None:
        """READY -> DRAINING, then wait (bounded) until the gateway has nothing in flight here."""
        busy = self._inflight.count(self.target)
        await self._set_state(
            WorkerState.DRAINING, f"draining before unload: {busy} request(s) in flight"
        )
        deadline = self._clock.monotonic() + self.spec.health.drain_timeout_s
        while self._inflight.count(self.target) and self._clock.monotonic() < deadline:
            if self.serve.state not in ROUTABLE_STATES:
                return
            await self._clock.sleep(0.05)

    async def _unload(self) -> None:
        if self._state is WorkerState.READY and self.serve.state in ROUTABLE_STATES:
            await self._drain()
        if self._state in (WorkerState.READY, WorkerState.STARTING):
            await self._set_state(WorkerState.STOPPING, f"unloading {self._tag} (keep_alive 0)")
        elif self._state is WorkerState.DRAINING:
            await self._set_state(WorkerState.STOPPING, "unloading after drain")
        if self.serve.state in ROUTABLE_STATES:
            timeout_s = self.spec.health.stop_grace_s
            await self._probe.post_json(
                f"{self.base_url}/api/generate",
                adapter.unload_request(self._tag),
                timeout_s=timeout_s,
            )
            deadline = self._clock.monotonic() + timeout_s
            while self._tag in await self._loaded() and self._clock.monotonic() < deadline:
                await self._clock.sleep(0.1)
        self.vram_mib = None
        await self._set_state(WorkerState.STOPPED, "unloaded")
