"""The read models composed: which ones there are, and ``Views``, the one object the API and the
worker query them through.

Each read model is a module that owns its tables, its fold (a mapping from event class to
handler) and the query functions over its tables:

- ``projections.jobviews``: poll's documents, the worker's pending and stored-artifact lists;
- ``projections.accounts``: API key hashes to principals, buyers' own provider keys;
- ``projections.orderbook``: seller offers, their state, health and capacity;
- ``projections.trades``: settled marketplace jobs, for volume and seller earnings;
- ``projections.ledger`` (fold) and ``projections.ledger_read`` (queries): the journal;
- ``projections.webhooks``: webhook deliveries, their tries, and the senders' due list.

``projections.store`` holds them in one database (exactly-once batches, schema version,
digests; ``projections.dialects``: SQLite or PostgreSQL, scratch storage). ``Views`` is that
store plus the query methods the API and the worker have always called (``views.get_job``,
``views.offer``, ``views.principal``, ...), each a one-line delegation to its read model's
query function; new code may call those functions directly with the views (or a snapshot) as
the reader.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from eventsourcing.utils import resolve_topic

from projections import accounts, jobviews, ledger, orderbook, trades, webhooks
from projections.accounts import BuyerProviderRow
from projections.dialects import PostgresStore, SQLiteStore, open_store, scratch_env
from projections.jobdoc import JobDoc
from projections.jobviews import JobRow
from projections.orderbook import OfferRow
from projections.store import Projection, Snapshot, Store

VIEWS_NAME = "views"
# What routing a submit reads: its model's order book and its buyer's own keys for the model.
RoutingInputs = tuple[list[OfferRow], list[BuyerProviderRow]]
# The events that change what ``Views.routing_inputs`` answers: an offer's own events and a
# buyer's keys'. (A settlement adds to an offer's lifetime totals, which routing never reads.)
ROUTING_EVENTS: frozenset[type] = frozenset(
    {cls for cls in orderbook.HANDLERS if cls is not orderbook.SettlementEvent.Settled}
    | accounts.PROVIDER_EVENTS
)
# In fold order: trades reads the order book's fold of the same batch.
PROJECTIONS: list[Projection] = [
    jobviews.PROJECTION,
    accounts.PROJECTION,
    orderbook.PROJECTION,
    trades.PROJECTION,
    ledger.PROJECTION,
    webhooks.PROJECTION,
]
JOB_VIEWS, ACCOUNTS, ORDER_BOOK, TRADES, LEDGER, WEBHOOKS = (p.name for p in PROJECTIONS)
TABLES: dict[str, str] = {t: s for p in PROJECTIONS for t, s in p.tables.items()}
# Every table's key columns, for digests.
DIGEST_ORDER: dict[str, str] = {t: k for p in PROJECTIONS for t, k in p.digest_order.items()}
GROUP_TABLES: dict[str, tuple[str, ...]] = {p.name: tuple(p.tables) for p in PROJECTIONS}

Part = frozenset[str]
ALL: Part = frozenset(GROUP_TABLES)
# A rebuild into scratch storage can fold the read models in two processes, each a part (then
# merged), so a CPU-bound Python fold gets a second core: parts that take about as long as
# each other on a busy market's log.
REBUILD_PARTS: tuple[Part, Part] = (ALL - {LEDGER}, frozenset({LEDGER}))


def part_tables(part: Part) -> list[str]:
    return [table for p in PROJECTIONS if p.name in part for table in p.tables]


def skips(part: Part, projections: Sequence[Projection] = PROJECTIONS) -> Callable[[str], bool]:
    """Whether a part's reader may leave an event of this topic undecoded: no read model of the
    part handles its class."""
    handled = frozenset(cls for p in projections if p.name in part for cls in p.handles)

    def skip(topic: str) -> bool:
        try:
            cls = resolve_topic(topic)
        except Exception:  # the decoder reports it as the library would
            return False
        return cls not in handled

    return skip


def headers_only(
    part: Part, projections: Sequence[Projection] = PROJECTIONS
) -> Callable[[str], bool]:
    """Whether a part's reader may give the events of this topic with their header only:
    every read model of the part that handles the class reads no more of them."""
    ours = [p for p in projections if p.name in part]

    def header_only(topic: str) -> bool:
        try:
            cls = resolve_topic(topic)
        except Exception:  # the decoder reports it as the library would
            return False
        readers = [p for p in ours if cls in p.handles]
        return bool(readers) and all(cls in p.headers_only for p in readers)

    return header_only


class Views(Store):
    """The store of every read model, with the query methods the API and the worker call."""

    def get_job(self, job_id: str) -> JobRow | None:
        return jobviews.get_job(self, job_id)

    def get_jobs(self, job_ids: Sequence[str]) -> dict[str, JobRow]:
        return jobviews.get_jobs(self, job_ids)

    def list_jobs(
        self, buyer_id: str, limit: int, after: str | None, status: str | None
    ) -> list[JobDoc] | None:
        return jobviews.list_jobs(self, buyer_id, limit, after, status)

    def job_models(self, job_ids: Sequence[str]) -> dict[str, str]:
        return jobviews.job_models(self, job_ids)

    def webhook_backlog(self) -> int:
        return webhooks.backlog(self)

    def webhook_deliveries(self, job_id: str) -> list[dict[str, Any]]:
        return webhooks.job_deliveries(self, job_id)

    def principal(self, key_hash: str) -> tuple[str, str, str] | None:
        return accounts.principal(self, key_hash)

    def buyer_providers(self, buyer_id: str, model: str | None = None) -> list[BuyerProviderRow]:
        return accounts.buyer_providers(self, buyer_id, model)

    def routing_inputs(self, wanted: Sequence[tuple[str, str]]) -> list[RoutingInputs]:
        """For each (model, buyer id) of ``wanted``: the model's order book and the buyer's
        own keys for it, as ``offers`` and ``buyer_providers`` give them; two queries per
        model, however many submits of how many buyers ask."""
        buyers_of: dict[str, list[str]] = {}
        for model, buyer_id in wanted:
            buyers_of.setdefault(model, []).append(buyer_id)
        books = {model: self.offers(model=model) for model in buyers_of}
        keys = {
            model: accounts.buyers_providers(self, buyers, model)
            for model, buyers in buyers_of.items()
        }
        return [(books[model], keys[model].get(buyer_id, [])) for model, buyer_id in wanted]

    def buyer_provider(self, provider_id: str) -> BuyerProviderRow | None:
        return accounts.buyer_provider(self, provider_id)

    def offers(
        self,
        *,
        model: str | None = None,
        seller_id: str | None = None,
        include_deleted: bool = False,
    ) -> list[OfferRow]:
        return orderbook.offers(
            self, model=model, seller_id=seller_id, include_deleted=include_deleted
        )

    def offer(self, offer_id: str) -> OfferRow | None:
        return orderbook.offer(self, offer_id)

    def market_activity(self, since: int) -> dict[str, dict[str, int]]:
        """Per model: settled marketplace jobs and their buyer cost, since ``since`` and ever."""
        activity = {
            model: {"jobs": jobs, "volume": volume, "jobs_24h": 0, "volume_24h": 0}
            for model, (jobs, volume) in orderbook.totals_by_model(self).items()
        }
        for model, (jobs, volume) in trades.activity_since(self, since).items():
            entry = activity.setdefault(
                model, {"jobs": 0, "volume": 0, "jobs_24h": 0, "volume_24h": 0}
            )
            entry.update(jobs_24h=jobs, volume_24h=volume)
        return activity

    def seller_earnings(
        self, seller_id: str, first_day: str | None, last_day: str | None
    ) -> list[tuple[str, str, int, int]]:
        return trades.seller_earnings(self, seller_id, first_day, last_day)


class SQLiteViews(Views, SQLiteStore):
    pass


class PostgresViews(Views, PostgresStore):
    pass


def open_views(env: dict[str, str], datastore: Any = None) -> Views:
    """The views ``env`` opens; on PostgreSQL in ``datastore``'s connection pool when given
    (the market's, so a process holds one pool)."""
    views = open_store(VIEWS_NAME, env, PROJECTIONS, SQLiteViews, PostgresViews, datastore)
    assert isinstance(views, Views)
    return views


def open_scratch_views(
    env: dict[str, str], application_name: str, goes_live: bool = False
) -> Views:
    """Views in storage from ``scratch_env``: a replay's, which needs no durability at all
    (``Store.without_durability``; ``goes_live``: a rebuild's, switched in at the end), and no
    secondary indexes while it is folded into (folds read rows by key only): they are built at
    the end (``Store.create_indexes``, which ``services.replay.rebuild`` calls)."""
    views = open_views(env)
    views.ensure_schema(application_name, indexes=False)
    views.without_durability(goes_live)
    return views


@contextmanager
def scratch_views(env: dict[str, str], application_name: str) -> Iterator[Views]:
    """Empty views in fresh storage beside the live ones, removed afterwards: where a replay
    can be proven."""
    with scratch_env(env) as scratch:
        views = open_scratch_views(scratch, application_name)
        try:
            yield views
        finally:
            views.datastore.close()


__all__ = [
    "BuyerProviderRow",
    "JobRow",
    "OfferRow",
    "Snapshot",
    "Views",
    "open_scratch_views",
    "open_views",
    "scratch_env",
    "scratch_views",
]
