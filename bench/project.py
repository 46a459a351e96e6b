"""Every name the replay bench takes from the project's own packages, imported here and nowhere
else in ``bench/``: when the project moves or renames one, this file is the one to change.

(The HTTP bench, ``bench.run`` and ``bench.profile``, imports no project code: it drives
``mediamarket serve`` as a separate process through the public API.)

Beside the plain re-exports, a few helpers wrap what reaches into the project's internals or
combines several of its names, so their callers do not depend on how that is done.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

from adapters.crypto import Secrets
from adapters.eventstore import MarketApp, open_market, store_env
from adapters.progress import Progress
from adapters.settings import Settings
from adapters.simulator import CATALOG, catalog_entry, parse_video_request
from adapters.venice import VideoParams, parse_venice_models
from api.validation import validate_video_request
from domain.aggregates import Offer, settlement_id
from domain.catalog import Catalog, VideoRequest
from domain.money import FeeSchedule, parse_multiplier, price_offer, usd_to_micros
from domain.routing import Candidate, Ranking, RoutingError, choose
from projections.runner import CATCH_UP_BATCH_SIZE, ProjectionRunner
from projections.views import VIEWS_NAME, Views, open_views, scratch_views
from projections.work import NAME as WORK_NAME
from projections.work import open_work
from services.commands import Commands
from services.replay import LogSource, rebuild
from services.routing import MAX_ROUTE_OFFERS, Route, request_data, video_params
from services.worker import LEASE_SECONDS

__all__ = [
    "CATCH_UP_BATCH_SIZE",
    "JOB_TTL_SECONDS",
    "LEASE_SECONDS",
    "MAX_ROUTE_OFFERS",
    "VIEWS_NAME",
    "WORK_NAME",
    "Candidate",
    "Commands",
    "FeeSchedule",
    "LogSource",
    "MarketApp",
    "Offer",
    "Progress",
    "ProjectionRunner",
    "Ranking",
    "Route",
    "RoutingError",
    "Secrets",
    "VideoRequest",
    "choose",
    "job_view_count",
    "open_market",
    "open_views",
    "open_work",
    "parse_multiplier",
    "price_offer",
    "rebuild",
    "scratch_views",
    "settlement_id",
    "simulator_catalog",
    "simulator_list_price",
    "single_threaded",
    "store_env",
    "validate_video_request",
]

# The engine's default job lifetime, as a running engine would set it.
JOB_TTL_SECONDS = int(Settings.model_fields["JOB_TTL_SECONDS"].default)


def simulator_catalog() -> Catalog:
    """The catalog a running engine loads from the embedded simulator's ``/models``."""
    return Catalog(parse_venice_models("venice", [catalog_entry(m) for m in CATALOG]))


def simulator_list_price(request: VideoRequest) -> int:
    """What the embedded simulator quotes for ``request``, in microdollars."""
    return _simulator_quote(video_params(request_data(request)))


@functools.cache
def _simulator_quote(params: VideoParams) -> int:
    # The quote depends on the parameters alone (and the simulator's fixed catalog): a log's
    # millions of requests have a few dozen different ones.
    return usd_to_micros(parse_video_request(params.body()).quote())


def job_view_count(views: Views) -> int:
    """Rows in the job views of ``views`` (a replay must leave one per job of the log)."""
    rows = views._all("SELECT COUNT(*) AS n FROM mm_job_views", ())
    return int(rows[0]["n"])


def single_threaded(commands: Commands) -> None:
    """``commands`` driven by one thread that owns every aggregate (the log generator): the
    locks that serialise a hot aggregate's writers and the group commit that joins concurrent
    submits have nobody to wait for, so each save goes straight to the app, in the same order
    with the same aggregates (the locks, their weak registry and the group commit's condition
    were 4% of generating a log)."""
    setattr(commands, "_group_commit", _Direct(commands.app))  # noqa: B010 (a private slot)
    setattr(commands, "_serialised", _unserialised)  # noqa: B010


class _Direct:
    def __init__(self, app: Any) -> None:
        self.app = app

    def save(self, *objs: Any) -> Any:
        return self.app.save(*objs)


_NO_LOCK = contextlib.nullcontext()


def _unserialised(*_: str) -> contextlib.AbstractContextManager[None]:
    return _NO_LOCK
