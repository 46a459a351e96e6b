"""Principals and buyer keys: who an API key belongs to (``mm_principals``, by the key's hash),
and each buyer's own provider keys (``mm_buyer_providers``, sealed as the events hold them)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from domain.aggregates import BuyerAccount, BuyerProvider, Seller
from projections.ids import id_text
from projections.store import (
    Batch,
    Projection,
    Reader,
    apply_in_order,
    chunks,
    dumps,
    placeholders,
)

NAME = "accounts"
BuyerEvent: Any = BuyerAccount  # generated event classes (see projections.jobdoc)
SellerEvent: Any = Seller
BuyerProviderEvent: Any = BuyerProvider

TABLES = {
    "mm_principals": (
        "CREATE TABLE IF NOT EXISTS mm_principals ("
        "key_hash TEXT PRIMARY KEY, kind TEXT NOT NULL, principal_id TEXT NOT NULL, "
        "name TEXT NOT NULL)"
    ),
    "mm_buyer_providers": (
        "CREATE TABLE IF NOT EXISTS mm_buyer_providers ("
        "provider_id TEXT PRIMARY KEY, seq BIGINT NOT NULL, buyer_id TEXT NOT NULL, "
        "provider TEXT NOT NULL, model TEXT, base_url TEXT, sealed_key TEXT NOT NULL, "
        "key_sha256 TEXT NOT NULL, created BIGINT NOT NULL, deleted BIGINT NOT NULL)"
    ),
}
INDEXES = [
    "CREATE INDEX IF NOT EXISTS mm_buyer_providers_buyer ON mm_buyer_providers (buyer_id, seq)",
]


@dataclass(frozen=True)
class BuyerProviderRow:
    provider_id: str
    seq: int
    buyer_id: str
    provider: str
    model: str | None
    base_url: str | None
    sealed_key: dict[str, str]
    key_sha256: str
    created: int
    deleted: int

    @property
    def key_id(self) -> str:
        return self.provider_id

    @property
    def key_context(self) -> str:
        return f"buyer-provider:{self.provider_id}"

    def public(self) -> dict[str, Any]:
        return {
            "id": self.provider_id,
            "object": "buyer.provider",
            "provider": self.provider,
            "model": self.model,
            "base_url": self.base_url,
            "created": self.created,
        }


PROVIDER_COLUMNS = list(BuyerProviderRow.__dataclass_fields__)

# --------------------------------------------------------------------------- the fold


class AccountsFold:
    def __init__(self, batch: Batch) -> None:
        self.principals: list[tuple[str, str, str, str]] = []
        self.providers: dict[str, dict[str, Any]] = {}
        # Keys created in an earlier batch and deleted in this one.
        self.deleted: list[str] = []

    def project(self, items: Sequence[tuple[int, Any]]) -> None:
        apply_in_order(self, HANDLERS, items)

    def write(self, c: Any, q: Callable[[str], Any]) -> None:
        if self.principals:
            c.executemany(
                q(
                    "INSERT INTO mm_principals (key_hash, kind, principal_id, name) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (key_hash) DO NOTHING"
                ),
                self.principals,
            )
        if self.providers:
            c.executemany(
                q(
                    f"INSERT INTO mm_buyer_providers ({', '.join(PROVIDER_COLUMNS)}) "
                    f"VALUES ({placeholders(PROVIDER_COLUMNS)}) ON CONFLICT (provider_id) "
                    "DO UPDATE SET deleted = excluded.deleted"
                ),
                [
                    tuple(dumps(p[k]) if k == "sealed_key" else p[k] for k in PROVIDER_COLUMNS)
                    for p in self.providers.values()
                ],
            )
        if self.deleted:
            c.executemany(
                q("UPDATE mm_buyer_providers SET deleted = 1 WHERE provider_id = ?"),
                [(provider_id,) for provider_id in self.deleted],
            )


def _buyer_created(fold: AccountsFold, seq: int, e: Any) -> None:
    fold.principals.append((e.api_key_hash, "buyer", id_text(e.originator_id), e.name))


def _seller_created(fold: AccountsFold, seq: int, e: Any) -> None:
    fold.principals.append((e.api_key_hash, "seller", id_text(e.originator_id), e.name))


def _provider_created(fold: AccountsFold, seq: int, e: Any) -> None:
    provider_id = id_text(e.originator_id)
    fold.providers[provider_id] = {
        "provider_id": provider_id,
        "seq": seq,
        "buyer_id": e.buyer_id,
        "provider": e.provider,
        "model": e.model,
        "base_url": e.base_url,
        "sealed_key": e.sealed_key,
        "key_sha256": e.key_sha256,
        "created": int(e.timestamp.timestamp()),
        "deleted": 0,
    }


def _provider_deleted(fold: AccountsFold, seq: int, e: Any) -> None:
    provider_id = id_text(e.originator_id)
    created = fold.providers.get(provider_id)
    if created is not None:
        created["deleted"] = 1
    else:
        fold.deleted.append(provider_id)


# A buyer's own keys: what routing reads of these views (``Views.routing_inputs``).
PROVIDER_EVENTS = frozenset({BuyerProviderEvent.Created, BuyerProviderEvent.Deleted})

HANDLERS: dict[type, Callable[[AccountsFold, int, Any], None]] = {
    BuyerEvent.Created: _buyer_created,
    SellerEvent.Created: _seller_created,
    BuyerProviderEvent.Created: _provider_created,
    BuyerProviderEvent.Deleted: _provider_deleted,
}

PROJECTION = Projection(
    name=NAME,
    tables=TABLES,
    indexes=INDEXES,
    digest_order={"mm_principals": "key_hash", "mm_buyer_providers": "provider_id"},
    handles=frozenset(HANDLERS),
    fold=AccountsFold,
)

# --------------------------------------------------------------------------- queries


def principal(r: Reader, key_hash: str) -> tuple[str, str, str] | None:
    """``(kind, principal id, name)`` of the API key with this hash."""
    row = r.one(
        "SELECT kind, principal_id, name FROM mm_principals WHERE key_hash = ?", (key_hash,)
    )
    return None if row is None else (row["kind"], row["principal_id"], row["name"])


def buyer_ids(r: Reader) -> set[str]:
    return {
        row["principal_id"]
        for row in r.all("SELECT principal_id FROM mm_principals WHERE kind = 'buyer'")
    }


def buyer_providers(r: Reader, buyer_id: str, model: str | None = None) -> list[BuyerProviderRow]:
    """A buyer's live provider keys; with ``model``, those that may serve it (its own keys and
    the catch-alls)."""
    clauses, params = ["buyer_id = ?", "deleted = 0"], [buyer_id]
    if model is not None:
        clauses.append("(model = ? OR model IS NULL)")
        params.append(model)
    rows = r.all(
        f"SELECT * FROM mm_buyer_providers WHERE {' AND '.join(clauses)} ORDER BY seq", params
    )
    return [_buyer_provider_row(row) for row in rows]


def buyers_providers(
    r: Reader, buyer_ids: Sequence[str], model: str
) -> dict[str, list[BuyerProviderRow]]:
    """``buyer_providers(r, buyer, model)`` of each of ``buyer_ids``, in as few queries as
    there are chunks of them (a buyer with no key is left out)."""
    found: dict[str, list[BuyerProviderRow]] = {}
    for chunk in chunks(sorted(set(buyer_ids))):
        rows = r.all(
            f"SELECT * FROM mm_buyer_providers WHERE buyer_id IN ({placeholders(chunk)}) "
            "AND deleted = 0 AND (model = ? OR model IS NULL) ORDER BY seq",
            [*chunk, model],
        )
        for row in rows:
            found.setdefault(row["buyer_id"], []).append(_buyer_provider_row(row))
    return found


def buyer_provider(r: Reader, provider_id: str) -> BuyerProviderRow | None:
    row = r.one("SELECT * FROM mm_buyer_providers WHERE provider_id = ?", (provider_id,))
    return None if row is None else _buyer_provider_row(row)


def provider_base_urls(r: Reader) -> dict[str, str | None]:
    """Every buyer key's base URL (None: the configured provider's)."""
    return {
        row["provider_id"]: row["base_url"]
        for row in r.all("SELECT provider_id, base_url FROM mm_buyer_providers")
    }


def _buyer_provider_row(row: Any) -> BuyerProviderRow:
    values = {k: row[k] for k in PROVIDER_COLUMNS}
    values["sealed_key"] = json.loads(values["sealed_key"])
    return BuyerProviderRow(**values)
