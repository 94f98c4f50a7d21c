"""API keys (admin): create one, revoke one."""

from __future__ import annotations

from fastapi import APIRouter, Path, Request
from starlette.responses import Response

from services.gateway.gateway import Gateway
from services.gateway.http import JSON, json_response, read_body
from services.gateway.models import ID_PATTERN, ApiKeyBody, ApiKeyCreated, decode_body
from services.gateway.models import Scope as KeyScope
from services.gateway.openapi import answer, problems, ref
from services.gateway.problems import Problem

__all__ = ["router"]


def router(gw: Gateway) -> APIRouter:
    router = APIRouter()
    settings = gw.settings

    @router.post(
        "/v1/api-keys", status_code=201,
        summary="Create an API key (admin) granting no more than the caller's own; the secret is shown once",
        tags=["api-keys"],
        openapi_extra={"requestBody": {"required": True, "content": {JSON: {"schema": ref("ApiKeyBody")}}}},
        responses={201: answer("The key and its secret", "ApiKeyCreated"), **problems(413)},
    )
    async def create_api_key(request: Request) -> Response:
        caller = await gw.principal(request)
        caller.require(KeyScope.ADMIN)
        body = decode_body(await read_body(request, settings.max_body_bytes), ApiKeyBody)
        record, secret = await gw.api_keys.create(body, caller)
        return json_response(
            ApiKeyCreated(
                key_id=record.key_id, name=record.name, portfolios=record.portfolios, scopes=record.scopes,
                created_at=record.created_at, secret=secret,
            ),
            201,
        )

    @router.delete(
        "/v1/api-keys/{key_id}", status_code=204,
        summary="Revoke an API key (admin) whose grant lies within the caller's; any other is a 404", tags=["api-keys"],
        responses={204: {"description": f"Revoked (other processes within {settings.key_cache_ttl_s:g} s)"},
                   **problems(404)},
    )
    async def revoke_api_key(request: Request, key_id: str = Path(pattern=ID_PATTERN)) -> Response:
        caller = await gw.principal(request)
        caller.require(KeyScope.ADMIN)
        if not await gw.api_keys.revoke(key_id, caller):
            raise Problem(404, "api_key_not_found", f"no API key {key_id}")
        return Response(status_code=204)

    return router
