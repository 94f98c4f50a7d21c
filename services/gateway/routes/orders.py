"""Orders: submit (``POST /v1/orders``, also served straight from ASGI by ``LeanOrders``),
read and cancel one."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Path, Request
from starlette.responses import Response

from services.core.replication import NotReplicated
from services.core.telemetry import get_logger
from services.gateway.auth import Principal
from services.gateway.deadline import not_replicated
from services.gateway.gateway import Gateway
from services.gateway.http import JSON, MAX_WAIT_S, json_response, parse_flag, parse_wait, read_body
from services.gateway.models import ID_PATTERN, OrderAccepted, OrderBody, decode_body, order_view
from services.gateway.models import Scope as KeyScope
from services.gateway.openapi import answer, problems, ref
from services.gateway.problems import Problem
from services.intake import OrderDesk, Submitted
from services.trading import Order

__all__ = ["Place", "place", "router"]

log = get_logger("zvt.gateway")

Place = Callable[[str | None, Callable[[], Awaitable[bytes]], str | None, str | None], Awaitable[Response]]
"""Submit an order: (authorization, read the body, ``wait``, ``durable``) to the answer."""


def place(gw: Gateway) -> Place:
    """The work of ``POST /v1/orders``, for the route and for ``LeanOrders`` alike."""
    settings = gw.settings

    async def place_order(
        authorization: str | None, read: Callable[[], Awaitable[bytes]], wait_param: str | None,
        durable_param: str | None = None,
    ) -> Response:
        caller = await gw.api_keys.authenticate(authorization)
        caller.require(KeyScope.TRADE)
        body = decode_body(await read(), OrderBody)
        quantity, price = OrderDesk.validate(body)
        caller.require(KeyScope.TRADE, body.portfolio_id)
        wait = parse_wait(wait_param) if wait_param is not None else None
        durable = parse_flag(durable_param, "durable") if durable_param is not None else False
        if durable and not gw.workflows.enabled:
            raise Problem(503, "workflows_unavailable", "durable orders need the workflow engine, which is not configured")
        if gw.overloaded:
            raise Problem(
                429, "backpressure", "the order pipeline is behind; retry later",
                headers={"Retry-After": str(settings.retry_after_s)},
            )
        if wait is not None:
            gw.wait_cap.take(caller.key_id)  # 429 too_many_waits: nothing submitted
        try:
            await gw.order_rate.check(caller.key_id)  # 429 rate_limited: one round trip
            try:
                submitted = await gw.desk.submit(body, quantity, price, caller.key_id, durable=durable)
            except NotReplicated as exc:
                raise not_replicated(exc, settings.retry_after_s) from None
            record = submitted.record
            headers: dict[str, str] = {}
            if durable:
                headers["X-Workflow-Run-Id"] = await start_durable(submitted)
            if wait is not None:
                key = gw.desk.record_key(record.order_id)
                if key is not None and not record.is_terminal:
                    record = await gw.waiters.wait(record.order_id, key, wait) or record
                done = record.is_terminal or not submitted.created
                return json_response(order_view(record), 200 if done else 202, headers)
            if not submitted.created:
                return json_response(order_view(record), 200, headers)
            return json_response(
                OrderAccepted(
                    order_id=record.order_id, client_order_id=record.client_order_id, status=record.status,
                    correlation_id=record.correlation_id,
                ),
                202,
                headers,
            )
        finally:
            if wait is not None:
                gw.wait_cap.give_back(caller.key_id)

    async def start_durable(submitted: Submitted) -> str:
        """The run of a durable order: started now, or the one started before. A repeat of an
        order whose run could not be started (the engine was down) starts it now."""
        record = submitted.record
        event = submitted.event
        if event is None:
            run_id = await gw.workflows.run_of_order(record)
            if run_id is not None:
                return run_id
            event = OrderDesk.durable_request(record)
        try:
            return await gw.workflows.start_order(record, event)
        except Exception as exc:
            log.error("could not start trading.place_order", order_id=record.order_id, error=str(exc))
            raise Problem(
                503, "workflows_unavailable",
                f"order {record.order_id} was accepted but its workflow could not be started; "
                "send the same request again",
            ) from exc

    return place_order


def router(gw: Gateway, place_order: Place) -> APIRouter:
    router = APIRouter()
    settings = gw.settings

    @router.post(
        "/v1/orders",
        status_code=202,
        summary="Submit an order",
        tags=["orders"],
        openapi_extra={
            "requestBody": {"required": True, "content": {JSON: {"schema": ref("OrderBody")}}},
            "parameters": [
                {
                    "name": "wait", "in": "query", "required": False,
                    "description": "Wait up to this many seconds for a terminal status, then answer with the full order "
                    "(200 if terminal, 202 if not yet).",
                    "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_WAIT_S},
                },
                {
                    "name": "durable", "in": "query", "required": False,
                    "description": "`true`: drive the order through the `trading.place_order` Hatchet workflow "
                    "instead of the streams; the same responses (the run id in `X-Workflow-Run-Id`).",
                    "schema": {"type": "boolean"},
                },
            ],
        },
        responses={
            200: answer("The same order submitted before with this `client_order_id` and body, or (with `wait`) the "
                        "order in a terminal status", "OrderView"),
            202: answer("Accepted; with `wait`, the full order as it is when the wait ran out", "OrderAccepted"),
            **problems(404, 409, 413, 429),
        },
    )
    async def submit_order(request: Request) -> Response:
        # Served by ``LeanOrders`` in front of the app; this route documents it in OpenAPI and
        # answers when the app is mounted without that middleware.
        return await place_order(
            request.headers.get("authorization"),
            lambda: read_body(request, settings.max_body_bytes),
            request.query_params.get("wait") if request.scope["query_string"] else None,
            request.query_params.get("durable") if request.scope["query_string"] else None,
        )

    async def visible_order(caller: Principal, order_id: str) -> tuple[Order, bool]:
        """The order (live, or rebuilt from the event store once it left Redis) and whether
        it is live; 404 when neither has it or the key does not grant its portfolio."""
        record, live = await gw.desk.find(order_id)
        if record is None or not caller.grants(record.portfolio_id):
            raise Problem(404, "order_not_found", f"no order {order_id}")
        return record, live

    @router.get(
        "/v1/orders/{order_id}", summary="An order (from the event store once it has left Redis)", tags=["orders"],
        responses={200: answer("The order", "OrderView"), **problems(404, 503)},
    )
    async def get_order(request: Request, order_id: str = Path(pattern=ID_PATTERN)) -> Response:
        caller = await gw.principal(request)
        caller.require(KeyScope.READ)
        record, _ = await visible_order(caller, order_id)
        return json_response(order_view(record))

    @router.delete(
        "/v1/orders/{order_id}", status_code=202, summary="Cancel an order", tags=["orders"],
        responses={202: answer("Cancel requested; the order as it is now", "OrderView"), **problems(404, 409)},
    )
    async def cancel_order(request: Request, order_id: str = Path(pattern=ID_PATTERN)) -> Response:
        caller = await gw.principal(request)
        caller.require(KeyScope.TRADE)
        record, live = await visible_order(caller, order_id)
        if record.is_terminal or not live:  # only a finished order leaves Redis
            raise Problem(409, "order_terminal", f"order {order_id} is already {record.status}")
        await gw.desk.request_cancel(record, caller.key_id)
        return json_response(order_view(record), 202)

    return router
