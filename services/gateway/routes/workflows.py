"""Workflow runs: start a rebalance, read a run."""

from __future__ import annotations

from decimal import Decimal

from fastapi import APIRouter, Path, Request
from starlette.responses import Response

from services.gateway.gateway import Gateway
from services.gateway.http import JSON, json_response, read_body
from services.gateway.models import ID_PATTERN, RebalanceBody, WorkflowRunAccepted, decode_body
from services.gateway.models import Scope as KeyScope
from services.gateway.openapi import answer, problems, ref
from services.gateway.problems import Problem
from services.workflows.contracts import REBALANCE, RebalanceInput

__all__ = ["router"]


def router(gw: Gateway) -> APIRouter:
    router = APIRouter()
    settings = gw.settings

    @router.get(
        "/v1/workflows/{run_id}", summary="A workflow run: status and result", tags=["workflows"],
        responses={200: {"description": "The run: `workflow`, `status` (queued, running, completed, failed), "
                                        "`result` or `error`, `step` (where it is, or where it failed) "
                                        "and `steps` (each step's start, end and events)"}, **problems(404)},
    )
    async def get_workflow(request: Request, run_id: str = Path(pattern=ID_PATTERN)) -> Response:
        caller = await gw.principal(request)
        caller.require(KeyScope.READ)
        run = await gw.workflows.runs.get(run_id)
        if run is None or not caller.grants(run.portfolio_id):
            raise Problem(404, "workflow_run_not_found", f"no workflow run {run_id}")
        return json_response(run)

    @router.post(
        "/v1/portfolios/{portfolio_id}/rebalance", status_code=202, summary="Start a rebalance (workflow)",
        tags=["workflows"],
        openapi_extra={"requestBody": {"required": True, "content": {JSON: {"schema": ref("RebalanceBody")}}}},
        responses={202: answer("Started; follow it at /v1/workflows/{run_id}", "WorkflowRunAccepted"), **problems(404)},
    )
    async def rebalance(request: Request, portfolio_id: str = Path(pattern=ID_PATTERN)) -> Response:
        caller = await gw.principal(request)
        caller.require(KeyScope.TRADE, portfolio_id)
        body = decode_body(await read_body(request, settings.max_body_bytes), RebalanceBody)
        total = Decimal(0)
        for symbol, raw in body.targets.items():
            weight = Decimal(raw)
            if not 0 <= weight <= 1:
                raise Problem.invalid(f"targets.{symbol}", "must be between 0 and 1")
            total += weight
        if total > 1:
            raise Problem.invalid("targets", "weights add up to more than 1")
        if not gw.workflows.enabled:
            raise Problem(503, "workflows_unavailable", "rebalancing needs the workflow engine, which is not configured")
        if await gw.portfolios.get(portfolio_id) is None:
            raise Problem(404, "portfolio_not_found", f"no portfolio {portfolio_id}")
        run_id = await gw.workflows.start_rebalance(RebalanceInput(
            portfolio_id=portfolio_id, targets=dict(body.targets), quote=body.quote,
            all_or_nothing=body.all_or_nothing, requested_by=caller.key_id,
        ))
        return json_response(WorkflowRunAccepted(run_id=run_id, workflow=REBALANCE, status="queued"), 202)

    return router
