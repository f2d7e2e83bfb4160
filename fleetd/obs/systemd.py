"""sd_notify without libsystemd: READY, STATUS, WATCHDOG, RELOADING and STOPPING datagrams.

Protocol (shared/reference/engines-nvml-systemd.md §D.1): one AF_UNIX datagram per message to
``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace), newline-separated
``KEY=VALUE`` lines. Unset ``NOTIFY_SOCKET`` means "not under systemd": every call is a no-op.
The watchdog is pinged from a task on the event loop itself, at half of ``WATCHDOG_USEC``, and
only while the daemon says it is healthy, so a wedged loop or a sick daemon stops the pings
and systemd acts.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping


class Notifier:
    """Talks to systemd's notification socket (or does nothing when there is none)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self._address: str | None = None
        if raw.startswith("/"):
            self._address = raw
        elif raw.startswith("@"):
            self._address = "\0" + raw[1:]
        self.watchdog_interval_s: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and watchdog_pid in ("", str(os.getpid())):
            self.watchdog_interval_s = int(usec) / 1e6 / 2
        self.sent: list[str] = []  # the last messages, for tests and `fleetctl status` someday

    @property
    def enabled(self) -> bool:
        """Whether systemd is listening."""
        return self._address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one datagram of KEY=VALUE lines (keys upper-cased); False when not sent."""
        if self._address is None:
            return False
        payload = "\n".join(f"{k.upper()}={v}" for k, v in fields.items())
        self.sent = [*self.sent[-20:], payload]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.connect(self._address)
                sock.sendall(payload.encode())
            except OSError:
                return False  # systemd went away (or never was): nothing to do about it
        return True

    def ready(self, status: str) -> None:
        """Start-up (or a reload) is complete."""
        self.notify(ready=1, status=_one_line(status))

    def status(self, text: str) -> None:
        """The one-line fleet summary ``systemctl status`` shows."""
        self.notify(status=_one_line(text))

    def reloading(self) -> None:
        """A reload began (followed by ``ready``)."""
        self.notify(reloading=1, monotonic_usec=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self, status: str) -> None:
        """Shutdown began."""
        self.notify(stopping=1, status=_one_line(status))

    async def watchdog(self, healthy: Callable[[], bool]) -> None:
        """Ping WATCHDOG=1 every half timeout while ``healthy()``; runs until cancelled."""
        if self._address is None or self.watchdog_interval_s is None:
            return
        while True:
            if healthy():
                self.notify(watchdog=1)
            await asyncio.sleep(self.watchdog_interval_s)


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]
