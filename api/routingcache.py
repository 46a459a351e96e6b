"""Routing's inputs kept in the process: a model's order book and a buyer's own keys for it,
read from the views again only when they may have changed.

Every submit routes on them. Read from the views, even in batches, they were a pool hand-off
and two queries on PostgreSQL, a tenth of a submit's time there (4 of its 41 ms at 32
connections). Kept, ``make bench``'s PostgreSQL submit row went from 770-800 to 896-899 jobs/s
and its p99 from 54-56 to 46-47 ms; SQLite's rate rose by about 5%.

Why an entry is never staler than the views, give or take one look of the projection runner
(as for ``api.jobcache``, every 50 ms or sooner):

* The runner hands ``passed`` the events it applied, and ``passed_elsewhere`` the topics of
  the ranges other processes' runners applied (read without decoding an event). Any event
  that changes what ``Views.routing_inputs`` answers (``ROUTING_EVENTS``: an offer's, a buyer
  key's) empties the cache before the runner's position moves past it.
* A read of the views that began before the cache was emptied is not kept (``generation``).
* Entries are served only while the runner keeps looking (``Engine.routing_inputs``).
* An empty order book is not kept: a model's first offer, made through another process, is
  routed to as soon as the views hold it.

Routing stays what it was with the views read every time; an offer that changed meanwhile is
still checked by the command that takes a slot of it (``Offer.take_slot``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from eventsourcing.utils import get_topic

from projections.accounts import BuyerProviderRow
from projections.views import ROUTING_EVENTS, RoutingInputs

ROUTING_TOPICS = frozenset(get_topic(cls) for cls in ROUTING_EVENTS)
MAX_KEYS = 4096  # (model, buyer) pairs; an order book is kept per model


class RoutingCache:
    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self.max_keys = max_keys
        self._books: dict[str, list[Any]] = {}
        self._keys: dict[tuple[str, str], list[BuyerProviderRow]] = {}
        self._lock = threading.Lock()  # the runner's thread empties, the event loop stores
        self.generation = 0  # how many times it was emptied

    def get(self, model: str, buyer_id: str) -> RoutingInputs | None:
        book = self._books.get(model)
        keys = self._keys.get((model, buyer_id))
        return None if book is None or keys is None else (book, keys)

    def put(self, generation: int, model: str, buyer_id: str, inputs: RoutingInputs) -> None:
        """Keep ``inputs``, read from the views after ``generation`` was current."""
        book, keys = inputs
        with self._lock:
            if generation != self.generation:
                return  # emptied since the read began: it may predate a change
            if book:
                self._books[model] = book
            if (model, buyer_id) not in self._keys and len(self._keys) >= self.max_keys:
                del self._keys[next(iter(self._keys))]  # the oldest stored
            self._keys[(model, buyer_id)] = keys

    def clear(self) -> None:
        with self._lock:
            self.generation += 1
            self._books.clear()
            self._keys.clear()

    def passed(self, items: Sequence[tuple[int, Any]]) -> None:
        """The projection runner's ``on_passed``: the views moved past ``items``."""
        if any(type(event) in ROUTING_EVENTS for _, event in items):
            self.clear()

    def passed_elsewhere(self, topics: set[str] | None) -> None:
        """The projection runner's ``on_topics_elsewhere``: other processes applied events of
        ``topics`` (None: of any)."""
        if topics is None or not ROUTING_TOPICS.isdisjoint(topics):
            self.clear()
