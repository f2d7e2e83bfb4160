"""Log lines shaped like vLLM's, for the vLLM emulator's processes.

Real vLLM prefixes every line with the process it comes from, e.g.
``(APIServer pid=7) INFO 11-24 10:00:00 [api_server.py:1912] Starting vLLM server on ...`` and
``(EngineCore_DP0 pid=9) ERROR ...``; uvicorn's lines pass through the same prefix. Supervisors
and people read these from the engine's log file, so the emulator writes the same shapes to
stdout (flushed per line: the file must be current when a test or fleetd reads it).

This module only formats and writes; it must not decide anything.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable


class VllmLog:
    """Writes ``(<proc> pid=N) LEVEL mm-dd HH:MM:SS [src] message`` lines to stdout."""

    def __init__(self, proc: str) -> None:
        self.proc = proc

    def _write(self, text: str) -> None:
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):  # log sink gone: logging must never kill us
            pass

    def line(self, level: str, src: str, message: str) -> None:
        """One log record (multi-line messages are split, each line prefixed, as vLLM does)."""
        stamp = time.strftime("%m-%d %H:%M:%S")
        prefix = f"({self.proc} pid={os.getpid()}) {level} {stamp} [{src}] "
        self._write("".join(f"{prefix}{part}\n" for part in message.split("\n")))

    def info(self, src: str, message: str) -> None:
        """An INFO record."""
        self.line("INFO", src, message)

    def warning(self, src: str, message: str) -> None:
        """A WARNING record."""
        self.line("WARNING", src, message)

    def error(self, src: str, message: str) -> None:
        """An ERROR record."""
        self.line("ERROR", src, message)

    def uvicorn(self, message: str) -> None:
        """A uvicorn-style line (``INFO:     ...``), which vLLM passes through its prefix."""
        self._write(f"({self.proc} pid={os.getpid()}) INFO:     {message}\n")

    def raw(self, lines: Iterable[str]) -> None:
        """Unprefixed lines, e.g. a traceback printed by Python itself."""
        self._write("".join(f"{text}\n" for text in lines))
