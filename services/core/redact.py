"""Secrets are never printed: one helper that masks credentials in any text before it is shown.

``redact`` replaces with ``***``:

- the password of a URL's userinfo (``redis://:pw@h``, ``rediss://user:pw@h``,
  ``postgresql://zvt:pw@h/db``, ``https://user:pw@hook``); a userinfo without a colon is
  masked whole (``https://TOKEN@h`` carries a token as the user name);
- the value of a ``key=value`` pair or URL query parameter, and of a quoted ``'key': value``
  pair, whose key names a secret (``password``, ``sslpassword``, ``secret``, ``token``,
  ``api_key``… also as the end of a longer name: ``ZVT_NOTIFICATIONS_WEBHOOK_SECRET=``);
- JSON Web Tokens (a Hatchet token) and ``Bearer`` credentials;
- the exact value of every secret the settings loaded (``remember``).

The settings error line, every structlog event, stdlib logging records and crash tracebacks
all pass through it (``services.core.settings.load``, ``services.core.telemetry``).
"""

from __future__ import annotations

import re
import threading

__all__ = ["MASK", "SECRET_KEY", "forget_all", "redact", "remember"]

MASK = "***"

_SECRET_WORDS = r"(?:password|passwd|passphrase|pwd|secret|token|api[_-]?key|apikey|private[_-]?key|credentials?)"
SECRET_KEY = re.compile(rf"^[\w.-]*?{_SECRET_WORDS}$", re.IGNORECASE)
"""A key (a log field, a query parameter, a variable) whose value is a secret."""

# scheme://userinfo@ - userinfo runs to the last '@' before the host (redis-py and urllib
# split there too), and stops at whatever ends an authority, a quoted string or an item of a
# comma-separated list of URLs (so a raw ',' in a password is not supported: percent-encode it).
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>[^\s/?#,'\"<>]*)@")
_QUOTED_VALUE = r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\""
# key=value (libpq DSN, URL query, env): the key may end a longer name, the value may be quoted.
_PAIR = re.compile(
    rf"(?P<key>(?<![\w.-])[\w.-]*?{_SECRET_WORDS})(?P<sep>\s*=\s*)(?P<value>{_QUOTED_VALUE}|[^\s&;'\"]+)",
    re.IGNORECASE,
)
# 'key': value (a dict's repr, JSON)
_QUOTED_PAIR = re.compile(
    rf"(?P<key>(?P<q>['\"])[\w.-]*?{_SECRET_WORDS}(?P=q))(?P<sep>\s*:\s*)(?P<value>{_QUOTED_VALUE}|[^\s,}}'\"]+)",
    re.IGNORECASE,
)
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"\b(?P<scheme>Bearer)(?P<sep>\s+)[A-Za-z0-9._~+/=-]{4,}", re.IGNORECASE)

_MIN_REMEMBERED = 8
"""Shorter secret values are not matched verbatim (they would mask ordinary words)."""

_lock = threading.Lock()
_known: frozenset[str] = frozenset()
_known_re: re.Pattern[str] | None = None


def remember(value: str) -> None:
    """Mask this exact value wherever it appears from now on (a loaded secret setting)."""
    global _known, _known_re
    if len(value) < _MIN_REMEMBERED or value in _known:
        return
    with _lock:
        known = _known | {value}
        _known_re = re.compile("|".join(re.escape(v) for v in sorted(known, key=len, reverse=True)))
        _known = known


def forget_all() -> None:
    """Stop masking remembered values (tests)."""
    global _known, _known_re
    with _lock:
        _known, _known_re = frozenset(), None


def _userinfo(match: re.Match[str]) -> str:
    info = match["info"]
    if ":" in info:
        return f"{match['scheme']}{info.split(':', 1)[0]}:{MASK}@"
    return f"{match['scheme']}{MASK}@"


def _pair(match: re.Match[str]) -> str:
    return f"{match['key']}{match['sep']}{MASK}"


def redact(text: str) -> str:
    """``text`` with every credential it carries replaced by ``***``; anything else unchanged."""
    known = _known_re
    if known is not None:
        text = known.sub(MASK, text)
    if "@" in text and "://" in text:
        text = _USERINFO.sub(_userinfo, text)
    if "=" in text:
        text = _PAIR.sub(_pair, text)
    if ":" in text:
        text = _QUOTED_PAIR.sub(_pair, text)
    if "eyJ" in text:
        text = _JWT.sub(MASK, text)
    if "earer" in text or "EARER" in text:
        text = _BEARER.sub(lambda m: f"{m['scheme']}{m['sep']}{MASK}", text)
    return text
