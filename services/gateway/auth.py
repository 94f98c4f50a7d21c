"""API keys: ``Authorization: Bearer <secret>``.

Only the SHA-256 of a secret is stored (``<ns>:global:apikey:<hash>``, with the index
``<ns>:global:apikeys`` of key id -> hash for revocation). Each process caches a lookup for
``ZVT_GATEWAY_KEY_CACHE_TTL_S`` (1 s by default), so a key revoked through another process
stops working within that time; the process that revokes it forgets it at once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import time
from typing import Any, Literal

import msgspec

from services.core.events import utcnow
from services.core.hotstate import StateKeys
from services.core.redisconn import AnyRedis
from services.gateway.models import ApiKeyBody, Scope
from services.gateway.problems import Problem

__all__ = ["ApiKeyRecord", "ApiKeys", "Principal", "hash_secret"]

BOOTSTRAP_KEY_ID = "bootstrap-admin"


class ApiKeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    key_id: str
    name: str
    portfolios: list[str] | Literal["*"]
    scopes: list[Scope]
    created_at: dt.datetime


class Principal:
    """Who is calling: a key's grants, answering "may it do this?"."""

    __slots__ = ("all_portfolios", "key_id", "portfolios", "record", "scopes")

    def __init__(self, record: ApiKeyRecord) -> None:
        self.record = record
        self.key_id = record.key_id
        self.all_portfolios = record.portfolios == "*"
        self.portfolios = frozenset(() if self.all_portfolios else record.portfolios)
        self.scopes = frozenset(record.scopes)

    def grants(self, portfolio_id: str) -> bool:
        return self.all_portfolios or portfolio_id in self.portfolios

    def has(self, scope: Scope) -> bool:
        return scope in self.scopes or Scope.ADMIN in self.scopes

    def require(self, scope: Scope, portfolio_id: str | None = None) -> None:
        """403 unless the key has ``scope`` (admin has every scope) and grants the portfolio."""
        if not self.has(scope):
            raise Problem(403, "forbidden", f"this API key lacks the `{scope}` scope")
        if portfolio_id is not None and not self.grants(portfolio_id):
            raise Problem(403, "forbidden", "this API key does not grant that portfolio")


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


_UNAUTHORIZED_HEADERS = {"WWW-Authenticate": "Bearer"}
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(ApiKeyRecord).decode


class ApiKeys:
    def __init__(self, redis: AnyRedis, keys: StateKeys, cache_ttl_s: float) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl = cache_ttl_s
        self._cache: dict[str, tuple[float, Principal | None]] = {}

    async def authenticate(self, authorization: str | None) -> Principal:
        """The caller of a request, or 401."""
        if not authorization or not authorization.startswith("Bearer ") or len(authorization) > 512:
            raise Problem(401, "unauthorized", "an API key is required: `Authorization: Bearer <key>`", headers=_UNAUTHORIZED_HEADERS)
        digest = hash_secret(authorization[7:].strip())
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            principal = cached[1]
        else:
            raw: Any = await self.redis.get(self.keys.api_key(digest))
            principal = Principal(_decode(raw)) if raw else None
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (now + self.ttl, principal)
        if principal is None:
            raise Problem(401, "unauthorized", "unknown or revoked API key", headers=_UNAUTHORIZED_HEADERS)
        return principal

    async def create(self, body: ApiKeyBody) -> tuple[ApiKeyRecord, str]:
        """A new key; returns it with its secret (never stored)."""
        secret = "zvt_" + secrets.token_urlsafe(32)
        record = ApiKeyRecord(
            key_id="key_" + secrets.token_hex(8),
            name=body.name,
            portfolios=body.portfolios if body.portfolios == "*" else sorted(set(body.portfolios)),
            scopes=sorted(set(body.scopes)),
            created_at=utcnow(),
        )
        await self._store(record, hash_secret(secret))
        return record, secret

    async def upsert_bootstrap(self, secret: str) -> None:
        """The operators' admin key from the settings (its previous secret, if any, stops working)."""
        record = ApiKeyRecord(
            key_id=BOOTSTRAP_KEY_ID, name="bootstrap admin", portfolios="*",
            scopes=[Scope.ADMIN, Scope.READ, Scope.TRADE], created_at=utcnow(),
        )
        digest = hash_secret(secret)
        previous: Any = await self.redis.hget(self.keys.api_key_index(), BOOTSTRAP_KEY_ID)
        if previous is not None and previous.decode() != digest:
            await self.redis.delete(self.keys.api_key(previous.decode()))
        await self._store(record, digest)

    async def revoke(self, key_id: str) -> bool:
        digest: Any = await self.redis.hget(self.keys.api_key_index(), key_id)
        if digest is None:
            return False
        await self.redis.delete(self.keys.api_key(digest.decode()))
        await self.redis.hdel(self.keys.api_key_index(), key_id)
        self._cache.pop(digest.decode(), None)
        return True

    async def _store(self, record: ApiKeyRecord, digest: str) -> None:
        await self.redis.set(self.keys.api_key(digest), _encode(record))
        await self.redis.hset(self.keys.api_key_index(), record.key_id, digest)
