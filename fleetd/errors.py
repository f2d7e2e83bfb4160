"""fleetd's exception hierarchy: every error a user can cause carries a message meant for them.

Results that are expected (a model that cannot be placed) are data, not exceptions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from fleetd.config_errors import Problem


class FleetdError(Exception):
    """Base of every error fleetd raises on purpose; its str() is shown to the user as is."""


class ConfigError(FleetdError):
    """The configuration is invalid; carries every problem found, not just the first."""

    def __init__(self, source: str, problems: Sequence[Problem]) -> None:
        self.source = source
        self.problems = tuple(problems)
        super().__init__(self.render())

    def render(self) -> str:
        """All problems, one per line, each naming key path, bad value and what is allowed."""
        count = len(self.problems)
        head = f"{self.source}: {count} problem{'s' if count != 1 else ''} in the configuration"
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])


class GpuBackendError(FleetdError):
    """The GPU backend cannot start at all (no driver, no NVML library, no permission)."""
