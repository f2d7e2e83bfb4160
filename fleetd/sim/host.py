"""The simulated GPU host: a directory that plays the driver's part for emulated engines.

Real engines allocate VRAM and the driver reports it per process; when a process dies the
driver frees its memory. Here the "driver" is a directory shared by every process of the
simulation:

    host.json                  the GPUs (uuid, name, total, reserved)
    faults.json                injected faults per GPU (lost, uncorrectable ECC count)
    events.jsonl               injected asynchronous events (XIDs), appended
    claims/<pid>-<uuid>.json   memory a process holds on a GPU

An emulated engine claims memory for its own pid (``claim``); the backend counts a claim only
while that pid is alive with the same start time, so memory is released when the process
dies however it dies, as with a real driver. Foreign processes can be simulated by claims
from any process (a real ``sleep``) or by persistent claims with a made-up pid.

Writes are atomic (write to a temporary file, then rename), so readers never see half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from fleetd.errors import FleetdError

ENV_SIM_DIR = "FLEETD_SIM_DIR"


class SimHostError(FleetdError):
    """The simulated host directory is missing or malformed, or a claim cannot be honoured."""


@dataclass(frozen=True, slots=True)
class SimGpuDef:
    """One simulated GPU as written to host.json."""

    index: int
    uuid: str
    name: str
    total_mib: int
    reserved_mib: int = 0


@dataclass(frozen=True, slots=True)
class Claim:
    """Memory held by one process on one GPU."""

    pid: int
    uuid: str
    used_mib: int
    name: str
    create_time: float | None  # psutil create_time of pid; None for persistent claims
    persistent: bool = False


def _atomic_write(path: Path, data: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(data)
        Path(tmp).replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            Path(tmp).unlink()
        raise


def _uuid_for(index: int, seed: str) -> str:
    # deterministic, well-formed NVML-style UUIDs (8-4-4-4-12 hex)
    import hashlib  # noqa: PLC0415

    digest = hashlib.sha256(f"{seed}:{index}".encode()).hexdigest()
    return f"GPU-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


class SimHost:
    """Handle on a simulated host directory; cheap to create, holds no open files."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # -- creation -------------------------------------------------------------------------
    @classmethod
    def create(
        cls, root: Path, gpus: list[tuple[str, int, int]], *, seed: str = "fleetd-sim"
    ) -> SimHost:
        """Create (or reset) a host with GPUs given as (name, total_mib, reserved_mib)."""
        root.mkdir(parents=True, exist_ok=True)
        (root / "claims").mkdir(exist_ok=True)
        for stale in (root / "claims").glob("*.json"):
            stale.unlink(missing_ok=True)
        defs = [
            asdict(SimGpuDef(i, _uuid_for(i, seed), name, total, reserved))
            for i, (name, total, reserved) in enumerate(gpus)
        ]
        _atomic_write(root / "host.json", json.dumps({"gpus": defs}, indent=2))
        _atomic_write(root / "faults.json", "{}")
        (root / "events.jsonl").write_text("")
        return cls(root)

    @classmethod
    def open_or_create(cls, root: Path, gpus: list[tuple[str, int, int]]) -> SimHost:
        """Reuse a host whose GPUs match (live claims kept, so engines can be adopted)."""
        host = cls(root)
        try:
            existing = [(g.name, g.total_mib, g.reserved_mib) for g in host.gpus()]
        except SimHostError:
            existing = []
        if existing == gpus and (root / "claims").is_dir():
            return host
        return cls.create(root, gpus)

    @classmethod
    def from_env(cls) -> SimHost:
        """The host named by $FLEETD_SIM_DIR (how emulated engines find their 'driver')."""
        value = os.environ.get(ENV_SIM_DIR)
        if not value:
            raise SimHostError(
                f"${ENV_SIM_DIR} is not set: emulated engines need a simulated host "
                "(run them under `fleetd demo` or create one with fleetd.sim.host.SimHost.create)"
            )
        return cls(Path(value))

    # -- reading --------------------------------------------------------------------------
    def gpus(self) -> list[SimGpuDef]:
        """The GPUs of the host, by index."""
        try:
            doc = json.loads((self.root / "host.json").read_text())
            return [SimGpuDef(**g) for g in doc["gpus"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SimHostError(f"simulated host at {self.root} is unreadable: {exc}") from None

    def resolve(self, ref: str) -> SimGpuDef:
        """A GPU by index ('1') or UUID, as CUDA_VISIBLE_DEVICES names it."""
        for gpu in self.gpus():
            if ref in (str(gpu.index), gpu.uuid):
                return gpu
        raise SimHostError(f"no simulated GPU {ref!r} at {self.root}")

    def faults(self) -> dict[str, dict[str, Any]]:
        """Injected faults keyed by GPU UUID."""
        try:
            data = json.loads((self.root / "faults.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def claims(self) -> list[Claim]:
        """Live claims; claims of dead processes are deleted, as the driver frees their memory."""
        out: list[Claim] = []
        for path in sorted((self.root / "claims").glob("*.json")):
            try:
                claim = Claim(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                continue  # being replaced right now, or garbage: ignore
            if claim.persistent or _alive(claim.pid, claim.create_time):
                out.append(claim)
            else:
                path.unlink(missing_ok=True)
        return out

    def read_events(self, offset: int) -> tuple[list[dict[str, Any]], int]:
        """Events appended since byte ``offset``, and the new offset."""
        path = self.root / "events.jsonl"
        try:
            with path.open("rb") as fh:
                fh.seek(offset)
                data = fh.read()
        except FileNotFoundError:
            return [], offset
        complete = data[: data.rfind(b"\n") + 1]
        events = [json.loads(line) for line in complete.splitlines() if line.strip()]
        return events, offset + len(complete)

    def events_end(self) -> int:
        """Current end of the event log (new readers start here)."""
        try:
            return (self.root / "events.jsonl").stat().st_size
        except FileNotFoundError:
            return 0

    # -- the driver's side: memory ----------------------------------------------------------
    def free_mib(self, uuid: str) -> int:
        """Free memory on one GPU now (total - reserved - live claims)."""
        gpu = self.resolve(uuid)
        used = sum(c.used_mib for c in self.claims() if c.uuid == gpu.uuid)
        return gpu.total_mib - gpu.reserved_mib - used

    def claim(
        self,
        uuid: str,
        used_mib: int,
        *,
        pid: int | None = None,
        name: str = "",
        persistent: bool = False,
        check_free: bool = True,
    ) -> Claim:
        """Hold ``used_mib`` on a GPU for ``pid`` (default: this process); replaces its claim.

        With ``check_free`` the claim fails like cudaMalloc does when memory is short.
        """
        gpu = self.resolve(uuid)
        pid = os.getpid() if pid is None else pid
        if self.faults().get(gpu.uuid, {}).get("lost"):
            raise SimHostError(f"gpu{gpu.index} is lost (CUDA error: GPU has fallen off the bus)")
        if check_free:
            others = sum(c.used_mib for c in self.claims() if c.uuid == gpu.uuid and c.pid != pid)
            free = gpu.total_mib - gpu.reserved_mib - others
            if used_mib > free:
                raise SimHostError(
                    f"CUDA out of memory on gpu{gpu.index}: tried to allocate {used_mib} MiB, "
                    f"{free} MiB free"
                )
        create_time = None if persistent else _create_time(pid)
        claim = Claim(pid, gpu.uuid, used_mib, name, create_time, persistent)
        _atomic_write(self._claim_path(pid, gpu.uuid), json.dumps(asdict(claim)))
        return claim

    def release(self, uuid: str, *, pid: int | None = None) -> None:
        """Drop a process's claim on a GPU (an engine unloading a model)."""
        gpu = self.resolve(uuid)
        self._claim_path(os.getpid() if pid is None else pid, gpu.uuid).unlink(missing_ok=True)

    def _claim_path(self, pid: int, uuid: str) -> Path:
        return self.root / "claims" / f"{pid}-{uuid}.json"

    # -- fault injection ------------------------------------------------------------------
    def set_fault(self, uuid: str, **fault: Any) -> None:  # noqa: ANN401 - JSON values
        """Merge fault fields for a GPU (``lost=True``, ``ecc_uncorrected=2``)."""
        gpu = self.resolve(uuid)
        faults = self.faults()
        faults.setdefault(gpu.uuid, {}).update(fault)
        _atomic_write(self.root / "faults.json", json.dumps(faults, indent=2))

    def clear_faults(self, uuid: str) -> None:
        """Heal a GPU, as a GPU reset does: faults cleared, sticky XID health forgotten."""
        gpu = self.resolve(uuid)
        faults = self.faults()
        faults.pop(gpu.uuid, None)
        _atomic_write(self.root / "faults.json", json.dumps(faults, indent=2))
        self._append_event({"uuid": gpu.uuid, "kind": "reset", "t": time.time()})

    def inject_xid(self, uuid: str, xid: int) -> None:
        """Append an XID event for a GPU, as the driver reports it through NVML's event set."""
        gpu = self.resolve(uuid)
        self._append_event({"uuid": gpu.uuid, "kind": "xid", "xid": xid, "t": time.time()})

    def _append_event(self, event: dict[str, Any]) -> None:
        # one write() of one line with O_APPEND: concurrent writers never interleave lines
        with (self.root / "events.jsonl").open("a") as fh:
            fh.write(json.dumps(event) + "\n")


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _alive(pid: int, create_time: float | None) -> bool:
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(proc.create_time() - create_time) < 0.01
    except psutil.Error:
        return False
