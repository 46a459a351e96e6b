"""Routing's inputs kept in the process (api/routingcache.py): what empties the cache, that a
read overtaken by a change is not kept, and that a change made through another process is
routed on as soon as this process's runner has looked at the views."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

from eventsourcing.utils import get_topic

from adapters.logreader import LogReader
from api.routingcache import ROUTING_TOPICS, RoutingCache
from domain.aggregates import BuyerAccount, BuyerProvider, Job, Offer
from projections.accounts import BuyerProviderRow
from projections.views import ROUTING_EVENTS
from tests.conftest import ServerFactory
from tests.test_lifecycle import (
    SEEDANCE,
    SEEDANCE_LIST_PRICE,
    buyer_cost,
    market,
    submit_ok,
    wait_until,
)

BOOK: list[Any] = ["an offer's row"]
KEYS: list[BuyerProviderRow] = []


def test_the_events_that_change_routing_are_an_offers_and_a_buyer_keys() -> None:
    assert Offer.Created in ROUTING_EVENTS and Offer.SlotTaken in ROUTING_EVENTS  # type: ignore[attr-defined]
    assert BuyerProvider.Created in ROUTING_EVENTS  # type: ignore[attr-defined]
    assert BuyerAccount.Held not in ROUTING_EVENTS  # type: ignore[attr-defined]
    assert Job.Created not in ROUTING_EVENTS  # type: ignore[attr-defined]
    assert get_topic(Offer.Updated) in ROUTING_TOPICS  # type: ignore[attr-defined]


def test_kept_until_an_event_that_changes_routing_passes() -> None:
    cache = RoutingCache()
    cache.put(cache.generation, "m", "b", (BOOK, KEYS))
    assert cache.get("m", "b") == (BOOK, KEYS)
    assert cache.get("m", "other") is None and cache.get("other", "b") is None

    class Held:  # not an event routing reads: nothing is dropped
        pass

    cache.passed([(1, Held())])
    cache.passed_elsewhere({"mediamarket.job.created.v1"})
    assert cache.get("m", "b") == (BOOK, KEYS)

    cache.passed([(2, Held()), (3, object.__new__(Offer.SlotTaken))])  # type: ignore[attr-defined]
    assert cache.get("m", "b") is None
    cache.put(cache.generation, "m", "b", (BOOK, KEYS))
    cache.passed_elsewhere({"mediamarket.job.created.v1", get_topic(Offer.Updated)})  # type: ignore[attr-defined]
    assert cache.get("m", "b") is None
    cache.put(cache.generation, "m", "b", (BOOK, KEYS))
    cache.passed_elsewhere(None)  # anything may have changed
    assert cache.get("m", "b") is None


def test_a_read_overtaken_by_a_change_is_not_kept_nor_an_empty_order_book() -> None:
    cache = RoutingCache(max_keys=2)
    began = cache.generation
    cache.clear()  # a change passed while the read was under way
    cache.put(began, "m", "b", (BOOK, KEYS))
    assert cache.get("m", "b") is None
    cache.put(cache.generation, "m", "b", ([], KEYS))
    assert cache.get("m", "b") is None  # a first offer made elsewhere is routed to at once
    for buyer in ("b1", "b2", "b3"):
        cache.put(cache.generation, "m", buyer, (BOOK, KEYS))
    assert cache.get("m", "b1") is None  # the oldest, past max_keys
    assert cache.get("m", "b3") == (BOOK, KEYS)


def test_the_log_reader_gives_the_topics_of_a_range_without_decoding(tmp_path: Any) -> None:
    from adapters.eventstore import open_market

    app = open_market(f"sqlite:///{tmp_path}/data")
    try:
        buyer = BuyerAccount(id=uuid4(), name="b", api_key_hash="h")
        buyer.deposit(5, "d")
        app.save(buyer)
        ids: set[str] = set()
        topics: set[str] = set()
        assert LogReader(app).originators(0, 10, None, ids, topics) == 2
        assert ids == {str(buyer.id)}
        assert topics == {get_topic(type(e)) for e in app.repository.event_store.get(buyer.id)}
    finally:
        app.close()


def test_an_offer_changed_through_another_process_is_routed_on(make_server: ServerFactory) -> None:
    """A routes submits on its kept order book; the seller reprices the offer through B; A's
    next submits are priced on the new multiplier once A's runner has looked at the views."""
    a = make_server("--no-worker")
    b = make_server("--no-worker")
    _, buyer_key, seller_key = market(a.client, deposit=200_000_000)
    offer = a.client.create_offer(seller_key, SEEDANCE, "sim_never", "0.80")
    first = submit_ok(a.client, buyer_key)
    again = submit_ok(a.client, buyer_key)  # from the kept order book
    assert again["estimated_cost_usdc"] == first["estimated_cost_usdc"]
    r = b.client.patch(
        f"/v1/seller/offers/{offer['id']}",
        key=seller_key,
        json_body={"cost_multiplier": "0.5"},
    )
    assert r.status == 200, r.body
    assert int(first["estimated_cost_usdc"]) == buyer_cost(SEEDANCE_LIST_PRICE, 80)
    cheaper = buyer_cost(SEEDANCE_LIST_PRICE, 50)

    def repriced() -> bool:
        return int(submit_ok(a.client, buyer_key)["estimated_cost_usdc"]) == cheaper

    # The runner looks every 50 ms; seconds here only keep a loaded machine from failing it.
    wait_until(repriced, timeout=3.0, what="the new price, through A", interval=0.02)
