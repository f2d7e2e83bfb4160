"""fleetd's state directory: records of running workers, so a new fleetd can adopt them.

Each engine process fleetd starts is recorded as ``workers/<key>.json`` (pid, process start
time, argv, port, GPU, log file) the moment it is spawned, and the record is removed when the
process is gone. A restarted fleetd reads the records, verifies each process is still the
one recorded (pid *and* start time, so a reused pid is never mistaken for an engine) and
adopts it instead of loading the model again (DESIGN decision 3).

Writes are atomic (temporary file + rename); a record that cannot be parsed is moved aside
to ``*.bad`` with an event, never silently dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """What fleetd needs to recognise and re-attach to an engine process."""

    key: str  # e.g. "vllm-mimo-vl-0-GPU-..." or "ollama-GPU-..."
    name: str
    engine: str
    pid: int
    create_time: float
    argv: list[str]
    port: int
    gpu_uuid: str
    log_path: str
    model: str | None = None  # vLLM: the model; Ollama: None (its slots are read from /api/ps)
    replica: int = 0


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (readers see the old or the new file, whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            Path(tmp).unlink()
        raise


def safe_key(text: str) -> str:
    """A file-name-safe key."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


class WorkerRecords:
    """The ``workers/`` folder of the state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "workers"

    def save(self, record: WorkerRecord) -> None:
        """Record (or replace) a worker."""
        atomic_write(self.dir / f"{record.key}.json", json.dumps(asdict(record), indent=2))

    def remove(self, key: str) -> None:
        """Forget a worker whose process is gone."""
        (self.dir / f"{key}.json").unlink(missing_ok=True)

    def load_all(self) -> tuple[list[WorkerRecord], list[str]]:
        """Every readable record, and a message per unreadable one (moved aside as .bad)."""
        records: list[WorkerRecord] = []
        problems: list[str] = []
        if not self.dir.is_dir():
            return records, problems
        for path in sorted(self.dir.glob("*.json")):
            try:
                records.append(WorkerRecord(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError) as exc:
                bad = path.with_suffix(".bad")
                with contextlib.suppress(OSError):
                    path.replace(bad)
                problems.append(f"unreadable worker record {path.name} ({exc}); kept as {bad.name}")
        return records, problems
