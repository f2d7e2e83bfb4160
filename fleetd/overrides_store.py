"""Operator overrides (scale, drain, cordon) persisted in the state dir, so they survive restarts.

One JSON file, ``overrides.json``, written atomically after every change. A file that cannot
be read or parsed is never silently dropped: it is moved aside (``overrides.json.bad-<time>``)
with a message for an event, and fleetd carries on from the config alone.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from fleetd.planning.types import Overrides
from fleetd.state import atomic_write

if TYPE_CHECKING:
    from pathlib import Path

FILE = "overrides.json"
FORMAT = 1


class _FormatError(ValueError):
    """The file parses as JSON but is not a valid overrides file."""


def to_json(ov: Overrides, drained_workers: dict[str, tuple[str, int, str]]) -> dict[str, Any]:
    """The file's content."""
    return {
        "format": FORMAT,
        "replicas": dict(sorted(ov.replicas.items())),
        "cordoned": sorted(ov.cordoned),
        "fault_cordoned": sorted(ov.fault_cordoned),
        "drained_gpus": sorted(ov.drained),
        "drained_models": sorted(ov.drained_models),
        "drained_workers": {
            name: {"model": m, "replica": r, "gpu_uuid": g}
            for name, (m, r, g) in sorted(drained_workers.items())
        },
    }


def from_json(doc: Any) -> tuple[Overrides, dict[str, tuple[str, int, str]]]:  # noqa: ANN401
    """Parse the file's content; ValueError naming the first bad field."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _FormatError(f"not an overrides file of format {FORMAT}")
    replicas = doc.get("replicas", {})
    if not isinstance(replicas, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in replicas.items()
    ):
        raise _FormatError("replicas must map model names to whole numbers >= 0")
    lists = {}
    for key in ("cordoned", "fault_cordoned", "drained_gpus", "drained_models"):
        value = doc.get(key, [])
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise _FormatError(f"{key} must be a list of strings")
        lists[key] = frozenset(value)
    workers: dict[str, tuple[str, int, str]] = {}
    raw_workers = doc.get("drained_workers", {})
    if not isinstance(raw_workers, dict):
        raise _FormatError("drained_workers must be a table")
    for name, item in raw_workers.items():
        if not (
            isinstance(item, dict)
            and isinstance(item.get("model"), str)
            and isinstance(item.get("replica"), int)
            and isinstance(item.get("gpu_uuid"), str)
        ):
            raise _FormatError(f"drained_workers.{name} needs model, replica and gpu_uuid")
        workers[name] = (item["model"], item["replica"], item["gpu_uuid"])
    ov = Overrides(
        replicas=dict(replicas),
        cordoned=lists["cordoned"],
        fault_cordoned=lists["fault_cordoned"] & lists["cordoned"],
        drained=lists["drained_gpus"],
        drained_models=lists["drained_models"],
        avoid=frozenset(workers.values()),
    )
    return ov, workers


class OverridesStore:
    """Loads and saves ``<state_dir>/overrides.json``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILE

    def load(self) -> tuple[Overrides, dict[str, tuple[str, int, str]], str | None]:
        """The persisted overrides, and a problem message when the file had to be set aside."""
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return Overrides(), {}, None
        except OSError as exc:
            return (
                Overrides(),
                {},
                f"cannot read {self.path}: {exc.strerror}; using the config alone",
            )
        try:
            ov, workers = from_json(json.loads(raw))
        except ValueError as exc:
            aside = self.path.with_name(f"{FILE}.bad-{time.strftime('%Y%m%dT%H%M%S')}")
            try:
                self.path.replace(aside)
            except OSError:
                aside = self.path
            return (
                Overrides(),
                {},
                (
                    f"{self.path} is corrupt ({exc}); kept as {aside.name}, "
                    "carrying on from the config"
                ),
            )
        return ov, workers, None

    def save(self, ov: Overrides, drained_workers: dict[str, tuple[str, int, str]]) -> None:
        """Write atomically (readers and crashes see the old or the new file, whole)."""
        atomic_write(self.path, json.dumps(to_json(ov, drained_workers), indent=2) + "\n")
