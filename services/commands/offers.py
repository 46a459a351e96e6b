"""Sellers' offers: listing, changing, removing, and the refusals that back them off."""

from __future__ import annotations

import uuid
from typing import Any
from uuid import UUID

from adapters.crypto import sha256_hex
from domain.aggregates import (
    Offer,
    Seller,
)
from services.commands.base import (
    CommandBase,
    NotFound,
    Written,
    position_of,
)


class OfferCommands(CommandBase):
    def create_offer(
        self,
        *,
        seller_id: UUID,
        model: str,
        provider: str,
        base_url: str | None,
        api_key: str,
        cost_multiplier: str,
        max_concurrent_jobs: int | None,
    ) -> tuple[UUID, Written]:
        self._get(Seller, seller_id)
        offer_id = uuid.uuid4()
        offer = Offer(
            id=offer_id,
            seller_id=str(seller_id),
            model=model,
            provider=provider,
            base_url=base_url,
            sealed_key=self.secrets.seal(api_key, context=f"offer:{offer_id}"),
            key_sha256=sha256_hex(api_key),
            cost_multiplier=cost_multiplier,
            max_concurrent_jobs=max_concurrent_jobs,
        )
        return offer_id, Written(position_of(self.app.save(offer)))

    def update_offer(self, seller_id: UUID, offer_id: UUID, changes: dict[str, Any]) -> Written:
        if "api_key" in changes:
            key = changes.pop("api_key")
            changes["sealed_key"] = self.secrets.seal(key, context=f"offer:{offer_id}")
            changes["key_sha256"] = sha256_hex(key)

        def attempt() -> Written:
            offer = self._seller_offer(seller_id, offer_id)
            offer.update(changes)
            return Written(position_of(self.app.save(offer)))

        return self._retrying(attempt)

    def delete_offer(self, seller_id: UUID, offer_id: UUID) -> Written:
        def attempt() -> Written:
            offer = self._seller_offer(seller_id, offer_id)
            offer.delete()
            return Written(position_of(self.app.save(offer)))

        return self._retrying(attempt)

    def _seller_offer(self, seller_id: UUID, offer_id: UUID) -> Offer:
        offer = self._get(Offer, offer_id)
        if offer.seller_id != str(seller_id) or offer.deleted:
            raise NotFound(str(offer_id))
        return offer

    def offer_refused(self, offer_id: UUID, reason: str, deactivate: bool) -> None:
        """Passive health: the offer's key failed (a quote here); back off exponentially."""

        def attempt() -> None:
            with self._serialised(f"offer:{offer_id}"):
                offer = self._get(Offer, offer_id)
                offer.refused(reason, now=self.clock(), deactivate=deactivate)
                self.app.save(offer)

        self._retrying(attempt)

    def open_key(self, context: str, sealed_key: dict[str, str]) -> str:
        # Routing opens every candidate's key on every submit; the plaintext is needed in
        # memory for the call anyway, so keep it rather than pay AES-GCM each time.
        cache_key = (context, sealed_key["ct"])
        key = self._open_keys.get(cache_key)
        if key is None:
            key = self.secrets.open(sealed_key, context=context)
            if len(self._open_keys) > 10_000:
                self._open_keys.clear()
            self._open_keys[cache_key] = key
        return key
