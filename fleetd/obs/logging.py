"""structlog set-up: human-readable on a terminal, JSON lines otherwise (journald, files).

Context such as ``worker=``, ``gpu=`` and ``model=`` is bound with structlog's contextvars by
the tasks that own those things, so every line they log carries it.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog


def configure(
    fmt: Literal["auto", "console", "json"] = "auto", *, level: int = logging.INFO
) -> None:
    """Configure structlog (and the stdlib root logger it renders through) once per process."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
