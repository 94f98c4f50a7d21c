"""``python -m services.notifications``: a webhook sink.

Consumes the event types people want to hear about (orders rejected, executed, failed and
canceled, risk breaches, alerts, rebalances, failed workflows; ``ZVT_NOTIFICATIONS_EVENT_TYPES``)
on both routes, as the plain (non-exclusive) group ``notifications``, and POSTs each event as
its JSON envelope to every ``ZVT_NOTIFICATIONS_WEBHOOK_URLS``, signed with
``ZVT_NOTIFICATIONS_WEBHOOK_SECRET`` (docs/notifications.md). Retries with backoff; what cannot
be delivered goes to the dead-letter stream with the reason. At least once: receivers dedupe
on ``X-ZVT-Event-Id``.
"""

from __future__ import annotations

import sys

from services.core.bus import Batch
from services.core.runtime import Service, main
from services.core.settings import SettingsError
from services.notifications.settings import NotificationsSettings, load_settings
from services.notifications.webhooks import Notifier

GROUP = "notifications"

BUDGET_SHARE = 0.8
"""Share of ``ZVT_BUS_RECLAIM_IDLE_MS`` a batch may spend delivering (retries included), so
that no entry is reclaimed, and sent again, while it is still being retried."""


def build(service: Service, settings: NotificationsSettings | None = None) -> Notifier:
    if settings is None:
        try:
            settings = load_settings()
        except SettingsError as exc:
            print(f"{service.name}: {exc.line}", file=sys.stderr)
            raise SystemExit(2) from None
    budget_s = service.bus_settings.reclaim_idle_ms / 1000 * BUDGET_SHARE
    notifier = Notifier(settings, budget_s=budget_s, sleep=service.sleep)

    async def start(_: Service) -> None:
        await notifier.start()

    async def close(_: Service) -> None:
        await notifier.close()

    async def ready() -> bool:
        return notifier.started

    service.on_startup(start)
    service.on_shutdown(close)
    service.readiness("webhooks", ready)
    # A webhook is a side effect outside Redis: drop events already delivered before posting
    # them again (precheck), not only at commit.
    service.consume(
        GROUP, dict.fromkeys(settings.event_types, Batch(notifier.handle)),
        routes=frozenset(settings.routes), precheck=True,
    )
    return notifier


if __name__ == "__main__":
    main("notifications", build, __doc__ or "")
