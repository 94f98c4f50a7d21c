"""The audit trail (``GET /v1/events``), from the event store."""

from __future__ import annotations

import msgspec
import psycopg
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from services.core.telemetry import get_logger
from services.gateway.deadline import outside_deadline
from services.gateway.gateway import Gateway
from services.gateway.http import json_response
from services.gateway.models import ID_PATTERN, EventsPage, StoredEventView
from services.gateway.models import Scope as KeyScope
from services.gateway.openapi import answer, problems
from services.gateway.problems import Problem

log = get_logger("zvt.gateway")

__all__ = ["router"]


def router(gw: Gateway) -> APIRouter:
    router = APIRouter()

    @router.get(
        "/v1/events", summary="The audit trail of one order or workflow run, in causal order", tags=["events"],
        responses={200: answer("The events this key may see", "EventsPage"), **problems(503)},
    )
    async def get_events(
        request: Request,
        correlation_id: str = Query(pattern=ID_PATTERN, description="An order id or workflow run id"),
        limit: int = Query(1000, ge=1, le=10_000),
    ) -> Response:
        caller = await gw.principal(request)
        caller.require(KeyScope.READ)
        try:
            with outside_deadline():  # the event store has its own timeouts and 503
                store = await gw.store()
                stored = await store.events_for_correlation(correlation_id, limit)
        except psycopg.errors.UndefinedTable:
            stored = []  # nothing recorded yet: the recorder creates the table
        except psycopg.Error as exc:
            log.warning("event store query failed", error=type(exc).__name__)
            raise Problem(503, "event_store_unavailable", "the event store cannot be queried") from None
        events = [
            StoredEventView(seq=s.seq, recorded_at=s.recorded_at, event=msgspec.to_builtins(s.event))
            for s in stored
            if caller.grants(s.event.portfolio_id)
        ]
        return json_response(EventsPage(correlation_id=correlation_id, events=events))

    return router
