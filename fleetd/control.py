"""Operator actions, independent of HTTP: what fleetctl's commands do to the daemon.

Each action validates its target, changes the overrides (persisted at once), records one
``operator.*`` event naming the caller (uid/pid from the socket), and kicks the reconciler;
the workers then do the work asynchronously. Read views (status, explain) live in
``fleetd.api.views``. Errors are ``ControlError`` with a stable code from
``fleetd.api.schemas.ERROR_CODES``; the HTTP status mapping happens in one place (the server).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from fleetd.errors import ConfigError, FleetdError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from fleetd import config
    from fleetd.api.schemas import ActionResult, GatewayJson
    from fleetd.obs.events import EventBus
    from fleetd.overrides_store import OverridesStore
    from fleetd.planning.gpu_faults import Change
    from fleetd.planning.types import Overrides
    from fleetd.reconciler import Reconciler


class ControlError(FleetdError):
    """An action was refused; ``code`` is stable, the message says what to do."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    """Who asked (from SO_PEERCRED on the control socket)."""

    uid: int | None = None
    pid: int | None = None

    def describe(self) -> str:
        """e.g. ``uid 1000 pid 4242``."""
        return f"uid {self.uid} pid {self.pid}" if self.uid is not None else "unknown caller"


class Control:
    """The daemon's operator interface."""

    def __init__(
        self,
        reconciler: Reconciler,
        bus: EventBus,
        *,
        store: OverridesStore,
        load_config: Callable[[], config.FleetConfig] | None = None,
    ) -> None:
        self.reconciler = reconciler
        self.bus = bus
        self.store = store
        self._load_config = load_config
        self.drained_workers: dict[str, tuple[str, int, str]] = {}
        # others that follow a reload (the gateway's names, rules and keys)
        self.config_listeners: list[Callable[[config.FleetConfig], None]] = []
        self.gateway_status: Callable[[], GatewayJson] | None = None  # set when it runs

    # -- start-up ----------------------------------------------------------------------------
    def restore(self) -> None:
        """Apply the persisted overrides (a corrupt file is set aside with an event)."""
        ov, workers, problem = self.store.load()
        if problem is not None:
            self.bus.emit("state.overrides_unreadable", problem)
        self.drained_workers = workers
        self.reconciler.overrides = ov
        if ov != type(ov)():
            self.bus.emit(
                "state.overrides_restored",
                f"restored operator overrides: {self._summary()}",
            )

    # -- actions -----------------------------------------------------------------------------
    def scale(self, model: str, replicas: int, caller: Caller) -> ActionResult:
        """Override the replica count of a model."""
        spec = self.model_spec(model)
        if not 0 <= replicas <= 64:
            raise ControlError("invalid_value", f"replicas must be 0-64, not {replicas}")
        ov = self.reconciler.overrides
        new = dict(ov.replicas)
        if replicas == spec.replicas:
            new.pop(model, None)  # back to the config's value: no override left behind
        else:
            new[model] = replicas
        return self._apply(
            dataclasses.replace(ov, replicas=new),
            "operator.scale",
            f"scale {model} to {replicas} (config says {spec.replicas})",
            caller,
            model=model,
            replicas=replicas,
        )

    def drain(
        self, target: str, name: str, caller: Caller, *, timeout_s: float | None = None
    ) -> ActionResult:
        """Move work off a worker, a GPU, or stop a model altogether, draining requests first."""
        ov = self.reconciler.overrides
        if timeout_s is not None and not 0 <= timeout_s <= 86400:
            raise ControlError("invalid_value", f"timeout_s must be 0-86400, not {timeout_s}")
        if target == "gpu":
            uuid, label = self._gpu(name)
            if timeout_s is not None:
                self.reconciler.drain_timeouts[uuid] = timeout_s
            return self._apply(
                dataclasses.replace(ov, drained=ov.drained | {uuid}),
                "operator.drain",
                f"drain {label}: its workers move elsewhere where capacity allows",
                caller,
                gpu=label,
            )
        if target == "model":
            self.model_spec(name)
            if timeout_s is not None:
                self.reconciler.drain_timeouts[name] = timeout_s
            return self._apply(
                dataclasses.replace(ov, drained_models=ov.drained_models | {name}),
                "operator.drain",
                f"drain model {name}: every replica stops after its requests finish",
                caller,
                model=name,
            )
        key = self._replica_worker(name)
        if timeout_s is not None:
            self.reconciler.drain_timeouts[key[0]] = timeout_s
        self.drained_workers[name] = key
        return self._apply(
            dataclasses.replace(ov, avoid=ov.avoid | {key}),
            "operator.drain",
            f"drain worker {name}: it leaves gpu{self._index(key[2])}; a replacement starts "
            "elsewhere where capacity allows",
            caller,
            worker=name,
        )

    def undrain(self, target: str, name: str, caller: Caller) -> ActionResult:
        """Undo a drain."""
        ov = self.reconciler.overrides
        if target == "gpu":
            uuid, label = self._gpu(name)
            if uuid not in ov.drained:
                raise ControlError("invalid_value", f"{label} is not drained")
            self.reconciler.drain_timeouts.pop(uuid, None)
            new = dataclasses.replace(ov, drained=ov.drained - {uuid})
            return self._apply(new, "operator.undrain", f"undrain {label}", caller, gpu=label)
        if target == "model":
            self.model_spec(name)
            if name not in ov.drained_models:
                raise ControlError("invalid_value", f"model {name} is not drained")
            self.reconciler.drain_timeouts.pop(name, None)
            new = dataclasses.replace(ov, drained_models=ov.drained_models - {name})
            return self._apply(new, "operator.undrain", f"undrain model {name}", caller, model=name)
        key = self.drained_workers.pop(name, None)
        if key is None:
            raise ControlError(
                "unknown_worker",
                f"no drained worker is called {name!r}; drained: "
                f"{', '.join(sorted(self.drained_workers)) or '(none)'}",
            )
        new = dataclasses.replace(ov, avoid=ov.avoid - {key})
        return self._apply(new, "operator.undrain", f"undrain worker {name}", caller, worker=name)

    def cordon(self, gpu: str, caller: Caller, *, on: bool) -> ActionResult:
        """Cordon (no new placements) or uncordon a GPU."""
        uuid, label = self._gpu(gpu)
        ov = self.reconciler.overrides
        cordoned = ov.cordoned | {uuid} if on else ov.cordoned - {uuid}
        verb = "cordon" if on else "uncordon"
        what = "running work stays, nothing new is placed" if on else "placements allowed again"
        if not on and uuid in ov.fault_cordoned:
            what += " (manual failback after a fault)"
            self.reconciler.faults.forget_flapping(uuid)
        return self._apply(
            dataclasses.replace(ov, cordoned=cordoned, fault_cordoned=ov.fault_cordoned - {uuid}),
            f"operator.{verb}",
            f"{verb} {label}: {what}",
            caller,
            gpu=label,
        )

    def restart(self, worker: str, caller: Caller) -> ActionResult:
        """Restart a worker (draining first) or reload an Ollama model; clears a failure."""
        owner = self.reconciler.find(worker)
        if owner is None:
            raise ControlError("unknown_worker", self.unknown_worker_message(worker))
        owner.restart()
        event = self.bus.emit(
            "operator.restart",
            f"restart {worker} (was {owner.state}) by {caller.describe()}",
            worker=worker,
            uid=caller.uid,
            pid=caller.pid,
        )
        return {"ok": True, "message": f"restarting {worker}", "event_seq": event.seq}

    def reload(self, caller: Caller) -> ActionResult:
        """Validate the config file again and adopt it; the running config stays on error."""
        if self._load_config is None:
            raise ControlError("invalid_value", "this daemon was started without a config file")
        try:
            new = self._load_config()
        except ConfigError as exc:
            self.bus.emit(
                "config.reload_failed",
                f"reload refused, keeping the running config: {exc.render()}",
                uid=caller.uid,
                pid=caller.pid,
            )
            raise ControlError("config_invalid", exc.render()) from None
        changed = self.reconciler.set_config(new)
        for listener in self.config_listeners:
            listener(new)
        event = self.bus.emit(
            "config.reloaded",
            f"config reloaded by {caller.describe()}: {len(new.models)} model(s)"
            + (f"; restarting {', '.join(changed)} with the new settings" if changed else ""),
            uid=caller.uid,
            pid=caller.pid,
        )
        return {"ok": True, "message": event.message, "event_seq": event.seq}

    def gpu_changes(self, changes: Sequence[Change]) -> None:
        """Act on the fault policy's decisions: events, fault cordons, failbacks (persisted)."""
        ov = self.reconciler.overrides
        for change in changes:
            fields: dict[str, object] = {"gpu": change.label, "gpu_uuid": change.uuid}
            if change.kind == "health":
                self.bus.emit(
                    f"gpu.{change.new.value}", change.reason, was=change.old.value, **fields
                )
            elif change.kind == "cordon":
                if change.uuid in ov.cordoned and change.uuid not in ov.fault_cordoned:
                    continue  # an operator's cordon: theirs to lift
                ov = dataclasses.replace(
                    ov,
                    cordoned=ov.cordoned | {change.uuid},
                    fault_cordoned=ov.fault_cordoned | {change.uuid},
                )
                self.bus.emit("gpu.fault_cordoned", change.reason, **fields)
            elif change.kind == "uncordon":
                ov = dataclasses.replace(
                    ov,
                    cordoned=ov.cordoned - {change.uuid},
                    fault_cordoned=ov.fault_cordoned - {change.uuid},
                )
                self.bus.emit("gpu.failback", change.reason, **fields)
            else:
                self.bus.emit("gpu.flapping", change.reason, **fields)
        if ov is not self.reconciler.overrides:
            self.store.save(ov, self.drained_workers)
            self.reconciler.overrides = ov

    # -- helpers -----------------------------------------------------------------------------
    def _apply(
        self,
        new: Overrides,
        kind: str,
        text: str,
        caller: Caller,
        **fields: object,
    ) -> ActionResult:
        self.store.save(new, self.drained_workers)
        self.reconciler.overrides = new
        self.reconciler.kick()
        event = self.bus.emit(
            kind, f"{text} (by {caller.describe()})", uid=caller.uid, pid=caller.pid, **fields
        )
        return {"ok": True, "message": text, "event_seq": event.seq}

    def model_spec(self, name: str) -> config.ModelSpec:
        """The model called ``name``; ControlError unknown_model lists the known ones."""
        spec = self.reconciler.cfg.model_named(name)
        if spec is None:
            known = ", ".join(m.name for m in self.reconciler.cfg.models) or "(none)"
            raise ControlError("unknown_model", f"no model is called {name!r}; known: {known}")
        return spec

    def _gpu(self, ref: str) -> tuple[str, str]:
        host = self.reconciler.host
        gpus = host.gpus if host is not None else ()
        for gpu in gpus:
            if ref in (str(gpu.index), f"gpu{gpu.index}", gpu.uuid):
                return gpu.uuid, f"gpu{gpu.index}"
        known = ", ".join(f"{g.index} ({g.uuid})" for g in gpus) or "(none seen yet)"
        raise ControlError("unknown_gpu", f"no GPU {ref!r}; GPUs: {known}")

    def _index(self, uuid: str) -> int | str:
        host = self.reconciler.host
        gpu = host.by_uuid(uuid) if host is not None else None
        return gpu.index if gpu is not None else uuid

    def _replica_worker(self, name: str) -> tuple[str, int, str]:
        owner = self.reconciler.find(name)
        if owner is None:
            raise ControlError("unknown_worker", self.unknown_worker_message(name))
        key = self.reconciler.replica_of(owner)
        if key is None:
            raise ControlError(
                "invalid_value",
                f"{name} is an Ollama server; drain its GPU (drain gpu N) or its models",
            )
        return key

    def unknown_worker_message(self, name: str) -> str:
        """What to say when no worker is called ``name``: the names there are."""
        names = ", ".join(s.name for s in self.reconciler.workers()) or "(none)"
        return f"no worker is called {name!r}; workers: {names}"

    def _summary(self) -> str:
        ov = self.reconciler.overrides
        parts = [f"{m}={n}" for m, n in sorted(ov.replicas.items())]
        parts += [f"cordoned {g}" for g in sorted(ov.cordoned)]
        parts += [f"drained gpu {g}" for g in sorted(ov.drained)]
        parts += [f"drained model {m}" for m in sorted(ov.drained_models)]
        parts += [f"drained worker {w}" for w in sorted(self.drained_workers)]
        return ", ".join(parts) or "none"
