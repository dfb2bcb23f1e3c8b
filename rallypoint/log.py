"""structlog set-up: JSON lines when stderr is not a terminal, readable key=value when it is.

Event names are stable identifiers (``rendezvous.plan_written``), never sentences, so they can be
grepped and alerted on; context such as ``node``, ``rank`` and ``gen`` is bound, not formatted in.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_configured = False


def configure_logging(level: str = "info", json: bool | None = None) -> None:
    """Configure structlog once per process.

    Args:
        level: minimum level name (debug, info, warning, error).
        json: force JSON (True) or console (False) output; None picks by ``sys.stderr.isatty()``.
    """
    global _configured
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(name: str, **context: Any) -> structlog.stdlib.BoundLogger:
    """Return a logger bound with ``component=name`` and any extra context."""
    if not _configured:
        configure_logging()
    return structlog.get_logger(component=name, **context)
