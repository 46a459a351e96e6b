"""JSON logs via structlog, with a last line of defence against secrets in any field."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

SECRET_FIELD = re.compile(r"(api_?key|token|authorization|secret|password|sealed)", re.I)
SECRET_VALUE = re.compile(r"\b(mm_(buyer|seller)_[A-Za-z0-9_-]+|mjt_[A-Za-z0-9_-]+|sim_\w+)")
# Secrets of no recognisable shape (the operator chooses the admin token): masked as given.
_LITERALS: set[str] = set()
# Shorter values would mask ordinary words; no secret worth the name is that short.
MIN_LITERAL_CHARS = 8


def mask_in_logs(*secrets: str | None) -> None:
    """Mask these exact values wherever they appear in a log line from now on."""
    _LITERALS.update(s for s in secrets if s and len(s) >= MIN_LITERAL_CHARS)


def _redact(value: str) -> str:
    value = SECRET_VALUE.sub("[redacted]", value)
    for literal in _LITERALS:
        if literal in value:
            value = value.replace(literal, "[redacted]")
    return value


def _mask(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event.items()):
        if SECRET_FIELD.search(key):
            event[key] = "[redacted]"
        elif isinstance(value, str):
            event[key] = _redact(value)
    return event


def configure_logging(level: str = "info") -> None:
    logging.basicConfig(format="%(message)s", stream=sys.stderr, level=level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _mask,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelName(level.upper())
            if isinstance(logging.getLevelName(level.upper()), int)
            else logging.INFO
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
