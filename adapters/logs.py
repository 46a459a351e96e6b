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


def _mask(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event.items()):
        if SECRET_FIELD.search(key):
            event[key] = "[redacted]"
        elif isinstance(value, str):
            event[key] = SECRET_VALUE.sub("[redacted]", value)
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
