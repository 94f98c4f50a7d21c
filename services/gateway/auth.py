"""API keys: ``Authorization: Bearer <secret>``, what each key may do, and who may mint or
revoke which key.

Only the SHA-256 of a secret is stored (``<ns>:global:apikey:<hash>``, with the index
``<ns>:global:apikeys`` of key id -> hash, to look a key up by its id). Each process caches
a lookup for ``ZVT_GATEWAY_KEY_CACHE_TTL_S`` (1 s by default) in a bounded LRU
(``ZVT_GATEWAY_KEY_CACHE_SIZE`` entries), so a key revoked through another process stops
working within that time; the process that revokes it forgets it at once. An unknown secret
is remembered as unknown for ``ZVT_GATEWAY_BAD_KEY_CACHE_TTL_S`` in a second LRU of the same
size, so repeating a bad token costs no Redis round trip; a token that cannot be a key at all
(neither ``zvt_`` and 43 URL-safe characters, as ``POST /v1/api-keys`` makes them, nor this
process's configured bootstrap secret) is refused without asking Redis.

A key never grants more than its creator holds (``Principal.covers``): its portfolios within
the creator's, each scope one the creator has (admin implies trade and read). A key may be
revoked by an admin whose grant covers it; to anyone else it does not exist (404).

The bootstrap admin key (``ZVT_GATEWAY_ADMIN_API_KEY``) is upserted at start. Once revoked
through the API its secret's hash joins ``<ns>:global:apikeys:revoked-bootstrap`` and that
secret is never upserted again; only configuring a different secret brings a bootstrap key
back.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Generic, Literal, NamedTuple, TypeVar

import msgspec

from services.core.events import utcnow
from services.core.hotstate import StateKeys
from services.core.redisconn import AnyRedis
from services.core.telemetry import get_logger
from services.gateway.models import ApiKeyBody, Scope
from services.gateway.problems import Problem

__all__ = ["BOOTSTRAP_KEY_ID", "ROUTE_SCOPES", "ApiKeyRecord", "ApiKeys", "Lru", "Principal", "RouteAccess", "hash_secret"]

log = get_logger("zvt.gateway.auth")

BOOTSTRAP_KEY_ID = "bootstrap-admin"

Grant = Literal["portfolio", "hidden", "filtered", "within", "none"]


class RouteAccess(NamedTuple):
    """What a route asks of the caller's key: a scope (admin implies trade and read) and how
    the key's portfolio grant applies (docs/api.md mirrors the table; a test walks it):

    - ``portfolio``: the portfolio named in the path or body must be granted, else 403;
    - ``hidden``: a resource of a portfolio not granted looks exactly like a missing one (404);
    - ``filtered``: what belongs to portfolios not granted is left out of the answer;
    - ``within``: the key created or revoked must lie within the caller's grant (portfolios
      and scopes); creating: 403, revoking: 404 as if the key did not exist;
    - ``none``: public (probes).
    """

    method: str
    path: str
    scope: Scope | None
    grant: Grant


ROUTE_SCOPES: tuple[RouteAccess, ...] = (
    RouteAccess("POST", "/v1/orders", Scope.TRADE, "portfolio"),
    RouteAccess("GET", "/v1/orders/{order_id}", Scope.READ, "hidden"),
    RouteAccess("DELETE", "/v1/orders/{order_id}", Scope.TRADE, "hidden"),
    RouteAccess("GET", "/v1/workflows/{run_id}", Scope.READ, "hidden"),
    RouteAccess("POST", "/v1/portfolios/{portfolio_id}/rebalance", Scope.TRADE, "portfolio"),
    RouteAccess("PUT", "/v1/portfolios/{portfolio_id}", Scope.ADMIN, "portfolio"),
    RouteAccess("GET", "/v1/portfolios/{portfolio_id}", Scope.READ, "portfolio"),
    RouteAccess("PUT", "/v1/portfolios/{portfolio_id}/trading-state", Scope.ADMIN, "portfolio"),
    RouteAccess("GET", "/v1/portfolios/{portfolio_id}/positions", Scope.READ, "portfolio"),
    RouteAccess("GET", "/v1/portfolios/{portfolio_id}/orders", Scope.READ, "portfolio"),
    RouteAccess("POST", "/v1/api-keys", Scope.ADMIN, "within"),
    RouteAccess("DELETE", "/v1/api-keys/{key_id}", Scope.ADMIN, "within"),
    RouteAccess("GET", "/v1/events", Scope.READ, "filtered"),
    RouteAccess("GET", "/healthz", None, "none"),
    RouteAccess("GET", "/readyz", None, "none"),
)


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

    def covers(self, portfolios: list[str] | Literal["*"], scopes: Iterable[Scope]) -> bool:
        """Whether a grant of ``portfolios`` and ``scopes`` lies within this key's: every
        portfolio granted here (``"*"`` only from ``"*"``), every scope held here (admin
        implies trade and read, so an admin may mint those)."""
        if portfolios == "*":
            if not self.all_portfolios:
                return False
        elif not self.all_portfolios and not self.portfolios.issuperset(portfolios):
            return False
        return all(self.has(scope) for scope in scopes)

    def require(self, scope: Scope, portfolio_id: str | None = None) -> None:
        """403 unless the key has ``scope`` (admin has every scope) and grants the portfolio."""
        if not self.has(scope):
            raise Problem(403, "forbidden", f"this API key lacks the `{scope}` scope")
        if portfolio_id is not None and not self.grants(portfolio_id):
            raise Problem(403, "forbidden", "this API key does not grant that portfolio")


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


V = TypeVar("V")


class Lru(Generic[V]):
    """At most ``size`` entries, each with its own expiry; the least recently used goes first."""

    __slots__ = ("_data", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[str, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str, now: float) -> tuple[float, V] | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return entry

    def put(self, key: str, expires: float, value: V) -> None:
        self._data[key] = (expires, value)
        self._data.move_to_end(key)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    def pop(self, key: str) -> None:
        self._data.pop(key, None)


_UNAUTHORIZED_HEADERS = {"WWW-Authenticate": "Bearer"}
_MISSING = "an API key is required: `Authorization: Bearer <key>`"
_UNKNOWN = "unknown or revoked API key"
_KEY_SHAPE = re.compile(r"zvt_[A-Za-z0-9_-]{43}")  # "zvt_" + secrets.token_urlsafe(32)
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(ApiKeyRecord).decode


def _unauthorized(detail: str) -> Problem:
    return Problem(401, "unauthorized", detail, headers=_UNAUTHORIZED_HEADERS)


class ApiKeys:
    def __init__(
        self, redis: AnyRedis, keys: StateKeys, cache_ttl_s: float, *, cache_size: int = 10_000,
        bad_key_ttl_s: float = 10.0,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl = cache_ttl_s
        self.bad_ttl = bad_key_ttl_s
        self._known: Lru[Principal] = Lru(cache_size)
        self._unknown: Lru[None] = Lru(cache_size)
        self._bootstrap: bytes | None = None
        self._revoked_bootstrap = keys.keys.global_key("apikeys", "revoked-bootstrap")

    def possible(self, secret: str) -> bool:
        """Whether ``secret`` could be a key at all: a minted one's shape, or the bootstrap
        secret this process was configured with (compared in constant time)."""
        if _KEY_SHAPE.fullmatch(secret):
            return True
        bootstrap = self._bootstrap
        return bootstrap is not None and hmac.compare_digest(secret.encode("utf-8", "replace"), bootstrap)

    async def authenticate(self, authorization: str | None) -> Principal:
        """The caller of a request, or 401."""
        if not authorization or not authorization.startswith("Bearer ") or len(authorization) > 512:
            raise _unauthorized(_MISSING)
        secret = authorization[7:].strip()
        if not self.possible(secret):
            raise _unauthorized(_UNKNOWN)
        digest = hash_secret(secret)
        now = time.monotonic()
        known = self._known.get(digest, now)
        if known is not None:
            return known[1]
        if self._unknown.get(digest, now) is not None:
            raise _unauthorized(_UNKNOWN)
        raw: Any = await self.redis.get(self.keys.api_key(digest))
        if not raw:
            if self.bad_ttl > 0:
                self._unknown.put(digest, now + self.bad_ttl, None)
            raise _unauthorized(_UNKNOWN)
        principal = Principal(_decode(raw))
        if self.ttl > 0:
            self._known.put(digest, now + self.ttl, principal)
        return principal

    async def create(self, body: ApiKeyBody, by: Principal) -> tuple[ApiKeyRecord, str]:
        """A new key; returns it with its secret (never stored). 403 unless its grant lies
        within the creator's."""
        if not by.covers(body.portfolios, body.scopes):
            raise Problem(
                403, "forbidden", "a key may grant only portfolios and scopes the creating key holds itself"
            )
        secret = "zvt_" + secrets.token_urlsafe(32)
        record = ApiKeyRecord(
            key_id="key_" + secrets.token_hex(8),
            name=body.name,
            portfolios=body.portfolios if body.portfolios == "*" else sorted(set(body.portfolios)),
            scopes=sorted(set(body.scopes)),
            created_at=utcnow(),
        )
        digest = hash_secret(secret)
        await self._store(record, digest)
        self._unknown.pop(digest)
        return record, secret

    async def upsert_bootstrap(self, secret: str) -> bool:
        """The operators' admin key from the settings (its previous secret, if any, stops
        working). A secret revoked through the API stays revoked: nothing is stored, False."""
        digest = hash_secret(secret)
        index = self.keys.api_key_index()
        previous: Any = await self.redis.hget(index, BOOTSTRAP_KEY_ID)
        if previous is not None and previous.decode() != digest:
            await self.redis.delete(self.keys.api_key(previous.decode()))
            await self.redis.hdel(index, BOOTSTRAP_KEY_ID)
        if await self.redis.sismember(self._revoked_bootstrap, digest):
            log.error("the configured bootstrap admin key was revoked through the API and stays revoked; "
                      "configure a new ZVT_GATEWAY_ADMIN_API_KEY to have one")
            self._bootstrap = None
            return False
        record = ApiKeyRecord(
            key_id=BOOTSTRAP_KEY_ID, name="bootstrap admin", portfolios="*",
            scopes=[Scope.ADMIN, Scope.READ, Scope.TRADE], created_at=utcnow(),
        )
        await self._store(record, digest)
        # revoked by another process between the check and the store: undo (revoke marks first)
        if await self.redis.sismember(self._revoked_bootstrap, digest):
            await self._forget(BOOTSTRAP_KEY_ID, digest)
            self._bootstrap = None
            return False
        self._bootstrap = secret.encode("utf-8", "replace")
        self._unknown.pop(digest)
        return True

    async def lookup(self, key_id: str) -> tuple[str, ApiKeyRecord] | None:
        """A key's secret hash and record, by its id."""
        digest: Any = await self.redis.hget(self.keys.api_key_index(), key_id)
        if digest is None:
            return None
        raw: Any = await self.redis.get(self.keys.api_key(digest.decode()))
        if not raw:
            return None
        return digest.decode(), _decode(raw)

    async def revoke(self, key_id: str, by: Principal) -> bool:
        """Revoke a key whose grant lies within ``by``'s; False when there is none (or it is
        not ``by``'s to revoke, which looks the same)."""
        found = await self.lookup(key_id)
        if found is None:
            return False
        digest, record = found
        if not by.covers(record.portfolios, record.scopes):
            return False
        if key_id == BOOTSTRAP_KEY_ID:
            await self.redis.sadd(self._revoked_bootstrap, digest)
            self._bootstrap = None
        await self._forget(key_id, digest)
        return True

    async def _forget(self, key_id: str, digest: str) -> None:
        await self.redis.delete(self.keys.api_key(digest))
        await self.redis.hdel(self.keys.api_key_index(), key_id)
        self._known.pop(digest)

    async def _store(self, record: ApiKeyRecord, digest: str) -> None:
        await self.redis.set(self.keys.api_key(digest), _encode(record))
        await self.redis.hset(self.keys.api_key_index(), record.key_id, digest)
