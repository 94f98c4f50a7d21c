"""The notifications service: a webhook sink for the events people want to hear about.

Receivers verify deliveries with ``verify_signature`` (docs/notifications.md).
"""

from services.notifications.signing import sign, signature_header, verify_signature

__all__ = ["sign", "signature_header", "verify_signature"]
