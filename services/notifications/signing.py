"""Webhook signatures: what the service sends, and how a receiver checks it.

Every delivery carries ``X-ZVT-Timestamp`` (unix seconds, when the attempt was made) and
``X-ZVT-Signature: sha256=<hex>``, the HMAC-SHA256, keyed with the shared secret, of the bytes
``<timestamp>.<body>``: the timestamp header's value, a full stop, then the raw request body
exactly as received (before any JSON parsing). A receiver recomputes it, compares in constant
time, and refuses timestamps too far from its clock, so a captured request cannot be replayed
later. Each retry is signed afresh with its own timestamp.

    from services.notifications import verify_signature

    ok = verify_signature(secret, request.headers["X-ZVT-Timestamp"], await request.body(),
                          request.headers["X-ZVT-Signature"], tolerance_s=300)
"""

from __future__ import annotations

import hashlib
import hmac
import time

__all__ = ["SIGNATURE_SCHEME", "sign", "signature_header", "verify_signature"]

SIGNATURE_SCHEME = "sha256"


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def sign(secret: str | bytes, timestamp: int | str, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``<timestamp>.<body>`` under ``secret``."""
    mac = hmac.new(_key(secret), f"{timestamp}.".encode(), hashlib.sha256)
    mac.update(body)
    return mac.hexdigest()


def signature_header(secret: str | bytes, timestamp: int | str, body: bytes) -> str:
    """The value of ``X-ZVT-Signature``: ``sha256=<hex>``."""
    return f"{SIGNATURE_SCHEME}={sign(secret, timestamp, body)}"


def verify_signature(
    secret: str | bytes,
    timestamp: str | int,
    body: bytes,
    header: str,
    tolerance_s: float = 300.0,
    *,
    now: float | None = None,
) -> bool:
    """Whether ``header`` (the ``X-ZVT-Signature`` value) signs ``body`` sent at ``timestamp``
    (the ``X-ZVT-Timestamp`` value) with ``secret``, and the timestamp is within
    ``tolerance_s`` seconds of ``now`` (default: the current time), either way.

    ``body`` must be the raw bytes received. Never raises on malformed input: returns False.
    """
    ts_text = str(timestamp).strip()
    if not ts_text.isascii() or not ts_text.isdigit() or len(ts_text) > 12:
        return False
    ts = int(ts_text)
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance_s:
        return False
    scheme, sep, given = header.strip().partition("=")
    if not sep or scheme.strip().lower() != SIGNATURE_SCHEME:
        return False
    expected = sign(secret, ts_text, body)
    return hmac.compare_digest(expected.encode(), given.strip().lower().encode("ascii", "replace"))
