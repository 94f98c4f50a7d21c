"""Wire codec for events: compact JSON through msgspec.

Decoding is two-step: the envelope first, with the payload left raw, so that an unknown event
type or an unsupported major version is named as such before any payload parsing happens.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from services.core.events import CATALOG, EVENT_CLASSES, Event, EventType

__all__ = ["DecodeError", "DecodeReason", "decode", "decode_any", "encode"]


class DecodeReason(enum.StrEnum):
    """Why an entry could not be decoded; the dead-letter stream carries it."""

    MALFORMED = "malformed"  # not an envelope at all
    UNKNOWN_TYPE = "unknown_event_type"
    UNSUPPORTED_VERSION = "unsupported_version"
    INVALID_PAYLOAD = "invalid_payload"
    WRONG_STREAM = "wrong_stream"  # an envelope whose type is not the stream's


class DecodeError(Exception):
    def __init__(self, reason: DecodeReason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


_encoder = msgspec.json.Encoder()
_decoders = {et: msgspec.json.Decoder(cls) for et, cls in EVENT_CLASSES.items()}
_raw_decoder = msgspec.json.Decoder(Event[msgspec.Raw])
_known_majors = {et: cls.VERSION.split(".", 1)[0] for et, cls in CATALOG.items()}


def encode(event: Event[Any]) -> bytes:
    return _encoder.encode(event)


def decode(data: bytes, expected: EventType) -> Event[Any]:
    """Decode one entry of the ``expected`` type's stream, in a single pass.

    Raises ``DecodeError`` naming why the entry is not a valid event of that type.
    """
    try:
        event: Event[Any] = _decoders[expected].decode(data)
    except (msgspec.DecodeError, ValueError):
        raise _diagnose(data, expected) from None
    if event.event_type is not expected:
        raise DecodeError(DecodeReason.WRONG_STREAM, f"{event.event_type} entry in the {expected} stream")
    if not event.version.startswith(_known_majors[expected] + "."):
        raise _unsupported(event.event_type, event.version)
    return event


def decode_any(data: bytes) -> Event[Any]:
    """Decode an entry of any type (tools, tests, the dead-letter inspector)."""
    try:
        event_type = _raw_decoder.decode(data).event_type
    except (msgspec.DecodeError, ValueError):
        raise _diagnose(data, None) from None
    return decode(data, event_type)


def _diagnose(data: bytes, expected: EventType | None) -> DecodeError:
    """Name the first thing wrong with an entry that failed the fast decode."""
    try:
        envelope = _raw_decoder.decode(data)
    except msgspec.ValidationError as exc:
        if "$.event_type" in str(exc):
            return DecodeError(DecodeReason.UNKNOWN_TYPE, str(exc))
        return DecodeError(DecodeReason.MALFORMED, str(exc))
    except (msgspec.DecodeError, ValueError) as exc:
        return DecodeError(DecodeReason.MALFORMED, str(exc))
    if expected is not None and envelope.event_type is not expected:
        return DecodeError(DecodeReason.WRONG_STREAM, f"{envelope.event_type} entry in the {expected} stream")
    if not envelope.version.startswith(_known_majors[envelope.event_type] + "."):
        return _unsupported(envelope.event_type, envelope.version)
    try:
        msgspec.json.decode(envelope.payload, type=CATALOG[envelope.event_type])
    except (msgspec.DecodeError, ValueError) as exc:
        return DecodeError(DecodeReason.INVALID_PAYLOAD, f"{envelope.event_type}: {exc}")
    return DecodeError(DecodeReason.MALFORMED, "undecodable entry")  # pragma: no cover


def _unsupported(event_type: EventType, version: str) -> DecodeError:
    return DecodeError(
        DecodeReason.UNSUPPORTED_VERSION,
        f"{event_type} version {version}; this consumer reads major {_known_majors[event_type]}",
    )
