"""Suite-wide guards: no test may leave a child process behind."""

from __future__ import annotations

from collections.abc import Iterator

import psutil
import pytest

# set in the environment of a daemon that a module-scoped fixture owns: its engines (which
# inherit the variable) may outlive a single test
LONG_LIVED = "FLEETD_TEST_LONG_LIVED"


@pytest.fixture(autouse=True)
def _no_leftover_children() -> Iterator[None]:
    """Fail a test that leaves processes running (engines must never be orphaned by fleetd)."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    leftovers = [p for p in me.children(recursive=True) if p.pid not in before]
    alive = []
    for proc in leftovers:
        try:
            if proc.environ().get(LONG_LIVED) == "1":
                continue  # belongs to a module-scoped daemon, which stops it at module end
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{proc.pid} {' '.join(proc.cmdline())[:80]}")
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    assert not alive, f"test left processes running: {alive}"
