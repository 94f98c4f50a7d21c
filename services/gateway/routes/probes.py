"""The API port's own probes: ``/healthz`` (liveness), ``/readyz`` (Redis and the pipeline)."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from services.gateway.gateway import Gateway
from services.gateway.http import json_response
from services.gateway.models import Health, Readiness
from services.gateway.openapi import answer

__all__ = ["router"]


def router(gw: Gateway) -> APIRouter:
    router = APIRouter()

    @router.get("/healthz", summary="Liveness", tags=["probes"], responses={200: answer("Alive", "Health")})
    async def healthz() -> Response:
        return json_response(Health(status="ok"))

    @router.get(
        "/readyz", summary="Readiness: Redis reachable and the pipeline caught up", tags=["probes"],
        responses={200: answer("Ready", "Readiness"), 503: answer("Not ready", "Readiness")},
    )
    async def readyz() -> Response:
        checks = await gw.ready()
        ok = all(checks.values())
        return json_response(Readiness(ready=ok, checks=checks), 200 if ok else 503)

    return router
