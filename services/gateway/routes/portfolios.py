"""Portfolios: create or update one (admin), read it, set its trading state (admin), its
positions and its recent orders."""

from __future__ import annotations

from fastapi import APIRouter, Path, Query, Request
from starlette.responses import Response

from services.gateway.auth import Principal
from services.gateway.gateway import Gateway
from services.gateway.http import JSON, json_response, read_body
from services.gateway.models import ID_PATTERN, OrdersPage, PortfolioBody, TradingStateBody, decode_body, order_view
from services.gateway.models import Scope as KeyScope
from services.gateway.openapi import answer, problems, ref
from services.gateway.problems import Problem
from services.trading.orders import OrderStatus

__all__ = ["router"]


def router(gw: Gateway) -> APIRouter:
    router = APIRouter()
    settings = gw.settings

    pid = Path(pattern=ID_PATTERN, description="Portfolio id")

    @router.put(
        "/v1/portfolios/{portfolio_id}", status_code=200, summary="Create or update a portfolio (admin)",
        tags=["portfolios"],
        openapi_extra={"requestBody": {"required": True, "content": {JSON: {"schema": ref("PortfolioBody")}}}},
        responses={
            200: answer("Updated", "PortfolioView"), 201: answer("Created", "PortfolioView"), **problems(409, 413),
        },
    )
    async def put_portfolio(request: Request, portfolio_id: str = pid) -> Response:
        caller = await gw.principal(request)
        caller.require(KeyScope.ADMIN, portfolio_id)
        body = decode_body(await read_body(request, settings.max_body_bytes), PortfolioBody)
        created, view = await gw.portfolios.put(portfolio_id, body)
        return json_response(view, 201 if created else 200)

    @router.get(
        "/v1/portfolios/{portfolio_id}", summary="A portfolio: balances, limits, trading state", tags=["portfolios"],
        responses={200: answer("The portfolio", "PortfolioView"), **problems(404)},
    )
    async def get_portfolio(request: Request, portfolio_id: str = pid) -> Response:
        caller = await gw.principal(request)
        caller.require(KeyScope.READ, portfolio_id)
        view = await gw.portfolios.get(portfolio_id)
        if view is None:
            raise Problem(404, "portfolio_not_found", f"no portfolio {portfolio_id}")
        return json_response(view)

    @router.put(
        "/v1/portfolios/{portfolio_id}/trading-state", summary="Set the trading state (admin)", tags=["portfolios"],
        openapi_extra={"requestBody": {"required": True, "content": {JSON: {"schema": ref("TradingStateBody")}}}},
        responses={200: answer("The portfolio", "PortfolioView"), **problems(404, 409, 413)},
    )
    async def put_trading_state(request: Request, portfolio_id: str = pid) -> Response:
        caller = await gw.principal(request)
        caller.require(KeyScope.ADMIN, portfolio_id)
        body = decode_body(await read_body(request, settings.max_body_bytes), TradingStateBody)
        return json_response(await gw.portfolios.set_trading_state(portfolio_id, body.state))

    async def existing_portfolio(caller: Principal, portfolio_id: str) -> None:
        caller.require(KeyScope.READ, portfolio_id)
        if await gw.portfolios.record(portfolio_id) is None:
            raise Problem(404, "portfolio_not_found", f"no portfolio {portfolio_id}")

    @router.get(
        "/v1/portfolios/{portfolio_id}/positions", summary="Positions with realized and unrealized PnL",
        tags=["portfolios"], responses={200: answer("The positions", "PositionsView"), **problems(404)},
    )
    async def get_positions(request: Request, portfolio_id: str = pid) -> Response:
        await existing_portfolio(await gw.principal(request), portfolio_id)
        return json_response(await gw.portfolios.positions(portfolio_id))

    @router.get(
        "/v1/portfolios/{portfolio_id}/orders", summary="Recent orders, newest first", tags=["portfolios"],
        responses={200: answer("The orders", "OrdersPage"), **problems(404)},
    )
    async def list_orders(
        request: Request,
        portfolio_id: str = pid,
        status: OrderStatus | None = Query(None, description="Only orders in this status"),
        limit: int = Query(50, ge=1, le=500, description="At most this many orders"),
    ) -> Response:
        await existing_portfolio(await gw.principal(request), portfolio_id)
        records = await gw.desk.recent(portfolio_id, status, limit)
        return json_response(OrdersPage(portfolio_id=portfolio_id, orders=[order_view(r) for r in records]))

    return router
