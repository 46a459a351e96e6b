"""Buyers, sellers, deposits, and the provider keys buyers bring themselves."""

from __future__ import annotations

import uuid
from uuid import UUID

from adapters.crypto import new_api_key, sha256_hex
from domain.aggregates import (
    BuyerAccount,
    BuyerProvider,
    Seller,
)
from services.commands.base import (
    CommandBase,
    NotFound,
    Written,
    position_of,
)


class AccountCommands(CommandBase):
    def create_buyer(self, name: str) -> tuple[UUID, str, Written]:
        api_key = new_api_key("mm_buyer")
        buyer = BuyerAccount(id=uuid.uuid4(), name=name, api_key_hash=sha256_hex(api_key))
        return buyer.id, api_key, Written(position_of(self.app.save(buyer)))

    def create_seller(self, name: str) -> tuple[UUID, str, Written]:
        api_key = new_api_key("mm_seller")
        seller = Seller(id=uuid.uuid4(), name=name, api_key_hash=sha256_hex(api_key))
        return seller.id, api_key, Written(position_of(self.app.save(seller)))

    def deposit(self, buyer_id: UUID, amount: int, deposit_id: str | None = None) -> Written:
        deposit_ref = deposit_id or str(uuid.uuid4())

        def attempt() -> Written:
            with self._account(buyer_id):
                buyer = self._get(BuyerAccount, buyer_id)
                if not buyer.deposit(amount, deposit_ref):
                    return Written(0)  # made before: nothing new to wait for
                return Written(position_of(self.app.save(buyer)))

        return self._retrying(attempt)

    def buyer(self, buyer_id: UUID) -> BuyerAccount:
        return self._get(BuyerAccount, buyer_id)

    # ------------------------------------------------------------------ buyer-owned providers

    def add_buyer_provider(
        self,
        *,
        buyer_id: UUID,
        provider: str,
        model: str | None,
        base_url: str | None,
        api_key: str,
    ) -> tuple[UUID, Written]:
        self._get(BuyerAccount, buyer_id)
        provider_id = uuid.uuid4()
        key = BuyerProvider(
            id=provider_id,
            buyer_id=str(buyer_id),
            provider=provider,
            model=model,
            base_url=base_url,
            sealed_key=self.secrets.seal(api_key, context=f"buyer-provider:{provider_id}"),
            key_sha256=sha256_hex(api_key),
        )
        return provider_id, Written(position_of(self.app.save(key)))

    def delete_buyer_provider(self, buyer_id: UUID, provider_id: UUID) -> Written:
        def attempt() -> Written:
            key = self._get(BuyerProvider, provider_id)
            if key.buyer_id != str(buyer_id) or key.deleted:
                raise NotFound(str(provider_id))
            key.delete()
            return Written(position_of(self.app.save(key)))

        return self._retrying(attempt)
