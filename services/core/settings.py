"""Settings: pydantic-settings models with the ``ZVT_`` prefix, one per component.

Every field has a description and bounds; ``docs/configuration.md`` is generated from the
registered models (``python -m services.core.settings > docs/configuration.md``) and a test
keeps it current. ``load`` turns an invalid value into one line naming the variable, with any
credential in it masked (``services.core.redact``): a secret field's value is never shown, a
URL or DSN is shown without its password.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.core.redact import MASK, redact, remember

__all__ = [
    "BusSettings", "CoreSettings", "PostgresSettings", "SettingsError", "load", "register", "registered",
]

S = TypeVar("S", bound=BaseSettings)

_REGISTRY: list[type[BaseSettings]] = []


def register(cls: type[S]) -> type[S]:
    """Add a settings model to the documented table."""
    _REGISTRY.append(cls)
    return cls


def registered() -> list[type[BaseSettings]]:
    return list(_REGISTRY)


class SettingsError(SystemExit):
    """An invalid setting: carries the one line printed at start-up, and exits with 2."""

    def __init__(self, line: str) -> None:
        super().__init__(2)
        self.line = line

    def __str__(self) -> str:
        return self.line


def load(cls: type[S], **overrides: Any) -> S:
    """Build settings from the environment, or raise ``SettingsError`` with one clear line.

    The line never shows a secret: a ``SecretStr`` field's value is left out (and masked if
    another field echoes it), and credentials in URLs and DSNs are masked. The values of the
    secrets loaded are remembered, so that no log line shows them either.
    """
    try:
        settings = cls(**overrides)
    except ValidationError as exc:
        raise SettingsError(_error_line(cls, exc, overrides)) from None
    for name, info in cls.model_fields.items():
        value = getattr(settings, name)
        if _is_secret(info.annotation) and isinstance(value, SecretStr):
            remember(value.get_secret_value())
    return settings


def _is_secret(annotation: Any) -> bool:
    return annotation is SecretStr or SecretStr in get_args(annotation)


def _error_line(cls: type[BaseSettings], exc: ValidationError, overrides: dict[str, Any]) -> str:
    err = exc.errors()[0]
    prefix = cls.model_config.get("env_prefix", "")
    field = str(err["loc"][0]) if err["loc"] else "?"
    if not err["loc"]:  # a check across fields: its message names the variable first
        named = re.search(rf"\b{re.escape(str(prefix))}(\w+)", str(err["msg"]))
        field = named.group(1).lower() if named else field
    value = err.get("input")
    secret = field in cls.model_fields and _is_secret(cls.model_fields[field].annotation)
    shown = "" if isinstance(value, dict) or secret else f" (got {value!r})"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    line = redact(f"invalid setting {prefix}{field.upper()}: {err['msg']}{shown}{more}")
    for raw in _secret_inputs(cls, overrides):
        line = line.replace(repr(raw), repr(MASK)).replace(raw, MASK)
    return line


def _secret_inputs(cls: type[BaseSettings], overrides: dict[str, Any]) -> list[str]:
    """The raw values given to the secret fields of ``cls`` (environment and overrides)."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    environ = {name.upper(): value for name, value in os.environ.items()}
    out: list[str] = []
    for name, info in cls.model_fields.items():
        if not _is_secret(info.annotation):
            continue
        given = overrides.get(name, environ.get(f"{prefix}{name}".upper()))
        raw = given.get_secret_value() if isinstance(given, SecretStr) else given
        if isinstance(raw, str) and len(raw) >= 4:  # shorter: replacing it would garble the line
            out.append(raw)
    return sorted(out, key=len, reverse=True)


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


@register
class CoreSettings(BaseSettings):
    """Settings every service process shares."""

    model_config = SettingsConfigDict(env_prefix="ZVT_", extra="ignore", frozen=True)

    service: str = Field("zvt", min_length=1, max_length=64, description="Service name in logs, metrics and traces.")
    redis_url: str = Field(
        "redis://127.0.0.1:6390/0",
        pattern=r"^rediss?://",
        description="Redis to use; for a cluster, the address of any one node.",
    )
    redis_cluster: bool = Field(False, description="Treat `ZVT_REDIS_URL` as a Redis Cluster node.")
    redis_username: str | None = Field(
        None, min_length=1, max_length=128,
        description="Redis ACL user; wins over a user in `ZVT_REDIS_URL`. Unset: the URL's, else `default`.",
    )
    redis_password: SecretStr | None = Field(
        None, min_length=1, max_length=512,
        description="Password of the Redis user (`requirepass` or an ACL user's); wins over a password in "
        "`ZVT_REDIS_URL`. A secret: pass it by reference.",
    )
    redis_tls_ca_file: str | None = Field(
        None, min_length=1, max_length=4096,
        description="PEM file of the CA(s) that signed the Redis server certificate (a `rediss://` URL); unset: "
        "the system's CAs. Must exist at start.",
    )
    redis_tls_cert_file: str | None = Field(
        None, min_length=1, max_length=4096,
        description="PEM client certificate for Redis servers that require one (`tls-auth-clients yes`); with "
        "`ZVT_REDIS_TLS_KEY_FILE`.",
    )
    redis_tls_key_file: str | None = Field(
        None, min_length=1, max_length=4096, description="PEM private key of `ZVT_REDIS_TLS_CERT_FILE`."
    )
    redis_tls_check_hostname: bool = Field(
        True,
        description="Check that the Redis server certificate names the host of the URL (and, on a cluster, of "
        "every node it announces). Turn off only for certificates without the right names; the chain is "
        "still verified.",
    )
    redis_timeout_s: float = Field(5.0, gt=0, le=60, description="Socket timeout for Redis commands, seconds.")
    redis_pool_timeout_s: float = Field(
        5.0, gt=0, le=60,
        description="How long a Redis command waits for a free connection when all 512 of the process's are in use "
        "(on a cluster: 512 commands in flight), seconds; then it fails with a connection error.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Lowest log level written.")
    log_format: Literal["json", "console"] = Field("json", description="`json` for machines, `console` for people.")
    http_host: str = Field("127.0.0.1", description="Address of the health and metrics endpoint; `0.0.0.0` in a pod.")
    http_port: int = Field(
        8081, ge=0, le=65535, description="Port of `/healthz`, `/readyz` and `/metrics`; 0 picks a free one."
    )
    otel_endpoint: str | None = Field(
        None, description="OTLP/HTTP traces endpoint (e.g. `http://collector:4318/v1/traces`); unset: no export."
    )
    otel_sample_ratio: float = Field(1.0, ge=0, le=1, description="Share of new traces sampled (parent-based).")
    drain_timeout_s: float = Field(
        20.0, gt=0, le=600, description="On SIGTERM, how long to finish the batches in hand before exiting."
    )

    @property
    def redis_tls(self) -> bool:
        """Whether Redis is reached over TLS (a ``rediss://`` URL)."""
        return self.redis_url.startswith("rediss://")

    @field_validator("redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file")
    @classmethod
    def _tls_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        url = info.data.get("redis_url")
        if isinstance(url, str) and not url.startswith("rediss://"):
            raise ValueError("needs a rediss:// ZVT_REDIS_URL (TLS); with redis:// nothing is encrypted")
        if not os.path.isfile(value):
            raise ValueError("no such file")
        return value

    @model_validator(mode="after")
    def _client_certificate_pair(self) -> CoreSettings:
        cert, key = self.redis_tls_cert_file, self.redis_tls_key_file
        if (cert is None) != (key is None):
            given, missing = ("CERT", "KEY") if key is None else ("KEY", "CERT")
            raise ValueError(f"ZVT_REDIS_TLS_{given}_FILE needs ZVT_REDIS_TLS_{missing}_FILE too (a client certificate and its key)")
        return self


PostgresSslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]


@register
class PostgresSettings(BaseSettings):
    """TLS of every connection to PostgreSQL (the recorder's and the gateway's event store). These win
    over the same parameters in a DSN's query (`?sslmode=verify-full&sslrootcert=/etc/zvt/pg-ca/ca.crt`),
    which works too; unset, the DSN's (else libpq's default, `prefer`) apply."""

    model_config = SettingsConfigDict(env_prefix="ZVT_POSTGRES_", extra="ignore", frozen=True)

    sslmode: PostgresSslMode | None = Field(
        None,
        description="libpq `sslmode`: `verify-full` in production (encrypted, the server certificate signed by "
        "`ZVT_POSTGRES_SSLROOTCERT` and naming the DSN's host); `require` encrypts without checking who answers.",
    )
    sslrootcert: str | None = Field(
        None, min_length=1, max_length=4096,
        description="PEM file of the CA(s) that signed the PostgreSQL server certificate (libpq `sslrootcert`; "
        "`system`: the system's CAs). Must exist at start.",
    )
    sslcert: str | None = Field(
        None, min_length=1, max_length=4096,
        description="PEM client certificate, for servers that authenticate clients by certificate (libpq `sslcert`).",
    )
    sslkey: str | None = Field(
        None, min_length=1, max_length=4096, description="PEM private key of `ZVT_POSTGRES_SSLCERT` (libpq `sslkey`)."
    )

    @field_validator("sslrootcert", "sslcert", "sslkey")
    @classmethod
    def _exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or (info.field_name == "sslrootcert" and value == "system"):
            return value
        if not os.path.isfile(value):
            raise ValueError("no such file")
        return value

    def connect_kwargs(self) -> dict[str, str]:
        """The libpq parameters set here, to pass to a connection (they win over the DSN's)."""
        return {name: value for name, value in self.model_dump().items() if value is not None}


@register
class BusSettings(BaseSettings):
    """The Redis Streams bus: sharding, batching, redelivery, dead letters, retention."""

    model_config = SettingsConfigDict(env_prefix="ZVT_BUS_", extra="ignore", frozen=True)

    namespace: str = Field(
        "zvt", pattern=r"^[A-Za-z0-9_.-]+$", max_length=64, description="Prefix of every stream and state key."
    )
    shards: int = Field(16, ge=1, le=4096, description="Shards per event type; a deploy-time constant like partitions.")
    batch_size: int = Field(
        512, ge=1, le=10_000, description="Entries one read takes at most, over all the streams it reads together."
    )
    read_loops: int = Field(
        2,
        ge=1,
        le=64,
        description="Read loops per consumer on a single Redis, each over its share of the shards (on a cluster: "
        "one per shard). Two let handling overlap the previous commit.",
    )
    block_ms: int = Field(
        500, ge=1, le=30_000, description="How long a read waits for new entries; also bounds how fast a stop is seen."
    )
    max_deliveries: int = Field(
        5, ge=1, le=1000, description="Deliveries after which a failing entry moves to the dead-letter stream."
    )
    reclaim_idle_ms: int = Field(
        30_000,
        ge=10,
        le=3_600_000,
        description="Idle time after which another consumer's pending entry is reclaimed; above the worst handling time.",
    )
    reclaim_interval_ms: int = Field(5_000, ge=10, le=3_600_000, description="How often pending entries are checked.")
    dedupe_ttl_s: int = Field(
        900,
        ge=1,
        le=7 * 86_400,
        description="How long a consumer group remembers event ids it has processed; each mark costs ~100 bytes "
        "of Redis memory, so memory ≈ events/s × groups × this × 100 B.",
    )
    precheck_duplicates: bool = Field(
        False,
        description="Also drop already-processed event ids before calling handlers (one more round trip per "
        "batch); duplicates are always dropped at commit.",
    )
    retention_s: int = Field(
        3_600,
        ge=0,
        le=90 * 86_400,
        description="Entries younger than this are kept even once every group has them: a floor, never a "
        "reason to cut (nothing a group has not acknowledged is ever trimmed).",
    )
    must_persist_groups: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["recorder"],
        description="Comma-separated groups that must exist on a stream before it is trimmed at all (every "
        "group on a stream, these or not, holds the trim behind what it has not acknowledged).",
    )
    deadletter_maxlen: int = Field(
        10_000,
        ge=100,
        le=10_000_000,
        description="Bound of each shard's dead-letter stream (`XADD MAXLEN ~`: about this many, the oldest "
        "dropped beyond it); alerted on at 80%.",
    )
    trim_interval_s: float = Field(30.0, ge=0, le=86_400, description="How often streams are trimmed; 0 turns it off.")
    lease_ttl_ms: int = Field(
        500,
        ge=100,
        le=600_000,
        description="Lifetime of the shard leases and membership heartbeat of exclusive consumers: a member "
        "that has not renewed them for this long (killed, frozen, cut off) is taken for dead and its shards "
        "move to the others, so this bounds the recovery time. Too short for the process's worst stall and "
        "a slow member loses its shards (its commits are refused, nothing is doubled).",
    )
    lease_renew_ms: int = Field(
        100,
        ge=10,
        le=200_000,
        description="How often an exclusive consumer renews its leases and heartbeat (one script call on a "
        "single Redis; one per held shard plus one on a cluster) and looks for dead or new members; at most "
        "a third of `ZVT_BUS_LEASE_TTL_MS`.",
    )
    lag_interval_s: float = Field(5.0, gt=0, le=3600, description="How often consumer-group lag is measured.")
    wait_replicas: int = Field(
        0,
        ge=0,
        le=16,
        description="Replicas that must confirm a write the platform makes a promise on (`WAIT`) before it goes "
        "on: the gateway's order submission before it answers 202, routing's route intent before it calls a "
        "venue. Fewer within `ZVT_BUS_WAIT_TIMEOUT_MS`: the gateway answers 503 `not_replicated` (retry with the "
        "same `client_order_id`), routing holds the batch and retries. 0: off (a single Redis has no replicas); "
        "the chart sets 1. At most the replicas of each master, or every such write fails.",
    )
    wait_timeout_ms: int = Field(
        250,
        ge=1,
        le=10_000,
        description="How long such a write waits for `ZVT_BUS_WAIT_REPLICAS` replicas, milliseconds; keep it well "
        "below `ZVT_GATEWAY_REQUEST_DEADLINE_S`.",
    )

    @field_validator("must_persist_groups", mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("lease_renew_ms")
    @classmethod
    def _renew_within_ttl(cls, value: int, info: ValidationInfo) -> int:
        ttl = info.data.get("lease_ttl_ms")
        if ttl is not None and value * 3 > ttl:
            raise ValueError(f"must be at most a third of ZVT_BUS_LEASE_TTL_MS ({ttl})")
        return value


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return " or ".join(f"`{a}`" for a in get_args(annotation))
    if annotation is type(None):
        return "None"
    if any(get_origin(a) is Literal for a in get_args(annotation)):  # an optional Literal
        return " or ".join(_type_name(a) for a in get_args(annotation))
    text = getattr(annotation, "__name__", None) if get_origin(annotation) is None else None
    return text or str(annotation).replace("typing.", "").replace(" | ", " or ")


# Modules whose import registers settings models; the table documents all of them.
DOCUMENTED_MODULES = (
    "services.core.runtime",
    "services.order.settings",
    "services.recorder.settings",
    "services.risk.settings",
    "services.routing.settings",
    "services.notifications.settings",
    "services.gateway.settings",
    "services.intake.settings",
    "services.workflows.settings",
)


def markdown() -> str:
    """The configuration table of every registered model."""
    import importlib

    for module in DOCUMENTED_MODULES:
        importlib.import_module(module)
    lines = ["# Configuration", "", "Every setting is an environment variable. Generated by", ""]
    lines += ["    python -m services.core.settings > docs/configuration.md", ""]
    lines += ["Invalid values stop the process at start with one line naming the variable.", ""]
    lines += [
        "Secrets are never printed, neither in that line nor in any log line, library log or crash",
        "traceback: the value of a secret setting (type `SecretStr`) is never shown, and credentials",
        "inside other values are shown as `***`: the password of a URL (`redis://:***@host`,",
        "`postgresql://zvt:***@host/db`, a webhook or venue URL; a user name alone is masked whole),",
        "a `password=`, `token=`, `secret=` or `api_key=` pair (in a key=value DSN or a URL query),",
        "a JSON Web Token (a Hatchet token) and a `Bearer` credential. A raw `,` in a URL's password is",
        "not supported (percent-encode it). See `services/core/redact.py`.",
        "",
        "In production every connection is authenticated and encrypted: Redis as an ACL user with its",
        "password (`ZVT_REDIS_USERNAME`, `ZVT_REDIS_PASSWORD`, or `rediss://user:password@host:6380/0`)",
        "over TLS (a `rediss://` URL and `ZVT_REDIS_TLS_*`, for a single Redis and every cluster node);",
        "PostgreSQL with `verify-full` (`ZVT_POSTGRES_*`, or `?sslmode=verify-full&sslrootcert=...` in",
        "the DSN), the gateway as a read-only role (`ZVT_RECORDER_READER_ROLE`). A wrong password or a",
        "refused TLS handshake stops a service at start with one line. See docs/operations.md,",
        "\"Secure the connections\".",
        "",
    ]
    order = {module: i for i, module in enumerate((__name__, *DOCUMENTED_MODULES))}
    documented = sorted(
        (cls for cls in _REGISTRY if cls.__module__ in order), key=lambda cls: order[cls.__module__]
    )
    for cls in documented:
        prefix = cls.model_config.get("env_prefix", "")
        lines += [f"## {cls.__name__}", "", (cls.__doc__ or "").strip(), ""]
        lines += ["| variable | type | default | bounds | description |", "|---|---|---|---|---|"]
        for name, info in cls.model_fields.items():
            default = info.get_default(call_default_factory=True)
            if isinstance(default, list):
                default = ",".join(default)
            bounds = ", ".join(
                f"{op} {getattr(m, attr)}"
                for m in info.metadata
                for attr, op in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "len ≥"), ("max_length", "len ≤"))
                if getattr(m, attr, None) is not None
            )
            annotation = _type_name(info.annotation)
            lines.append(
                f"| `{prefix}{name.upper()}` | {annotation} | `{default}` | {bounds} | {info.description or ''} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    # Run as a script this file is ``__main__``, a second copy of the module; the models of
    # other packages register with the real one.
    from services.core import settings as _settings

    sys.stdout.write(_settings.markdown())
