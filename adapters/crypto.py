"""Secrets at rest: provider keys sealed with AES-GCM, API keys and tokens as hashes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


class SecretError(Exception):
    pass


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def new_api_key(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def _derive(master: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(master)


class Secrets:
    """Everything derived from ``MEDIAMARKET_SECRET_KEY``; one place knows the master key."""

    def __init__(self, master_key: str) -> None:
        if len(master_key) < 16:
            raise SecretError("MEDIAMARKET_SECRET_KEY must be at least 16 characters")
        master = master_key.encode()
        self._key_id = sha256_hex(master_key)[:8]
        self._aead = AESGCM(_derive(master, b"mediamarket/provider-keys/v1"))
        self._token_key = _derive(master, b"mediamarket/job-tokens/v1")
        self._url_key = _derive(master, b"mediamarket/artifact-urls/v1")

    @staticmethod
    def generate_master_key() -> str:
        return base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")

    def seal(self, plaintext: str, context: str) -> dict[str, str]:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), context.encode())
        return {"kid": self._key_id, "ct": base64.b64encode(nonce + sealed).decode()}

    def open(self, sealed: dict[str, str], context: str) -> str:
        if sealed.get("kid") != self._key_id:
            raise SecretError("sealed with another MEDIAMARKET_SECRET_KEY")
        raw = base64.b64decode(sealed["ct"])
        try:
            return self._aead.decrypt(raw[:12], raw[12:], context.encode()).decode()
        except InvalidTag as e:
            raise SecretError("sealed secret failed authentication") from e

    def job_token(self, job_id: str) -> str:
        """Derived, not random, so an idempotent replay can hand back the same token."""
        mac = hmac.new(self._token_key, job_id.encode(), hashlib.sha256).digest()
        return "mjt_" + base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def sign_url(self, path: str, expires: int) -> str:
        mac = hmac.new(self._url_key, f"{path}:{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac[:18]).decode()

    def verify_url(self, path: str, expires: int, signature: str) -> bool:
        return hmac.compare_digest(self.sign_url(path, expires), signature)
