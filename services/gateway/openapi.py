"""The OpenAPI document: what the routes declare (``answer``, ``problems``), completed with the
bodies' msgspec schemas, the problem documents and the bearer scheme (``install_openapi``)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from services.gateway.http import JSON
from services.gateway.models import openapi_components

__all__ = ["PROBLEM_TEXT", "answer", "install_openapi", "problems", "ref"]


def ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def answer(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": ref(schema)}}}


PROBLEM_TEXT = {
    401: "Missing, unknown or revoked API key",
    403: "The key lacks the scope or does not grant the portfolio (`forbidden`)",
    404: "Not found (or not visible to this key)",
    409: "Conflict",
    413: "Body too large (`payload_too_large`)",
    422: "Invalid input; `errors` names each field",
    429: "The pipeline is behind (`backpressure`), or the key is over its order rate (`rate_limited`) or its "
         "open waits (`too_many_waits`); retry after `Retry-After` seconds",
    503: "A dependency is unavailable: Redis (`redis_unavailable`, or `deadline_exceeded` when it does not answer "
         "within the request deadline, or `not_replicated` when too few Redis replicas confirmed an order in time; "
         "with `Retry-After`), the event store or the workflow engine",
}


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for code in (401, 403, 422, *codes):
        out[code] = {"description": PROBLEM_TEXT[code], "content": {"application/problem+json": {"schema": ref("ProblemBody")}}}
    if 429 in codes:
        out[429]["headers"] = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}}
    out[401]["headers"] = {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}}
    return out


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes,
        )
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        schemas.update(openapi_components())
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        problem = {"content": {"application/problem+json": {"schema": ref("ProblemBody")}}}
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                if "422" in responses:
                    responses["422"] = {"description": PROBLEM_TEXT[422], **problem}
                if path.startswith("/v1/"):
                    operation["security"] = [{"bearer": []}]
                    responses.setdefault("503", {"description": PROBLEM_TEXT[503], **problem})
                    responses["503"]["headers"] = {
                        "Retry-After": {"description": "Seconds to wait (Redis unavailable or too slow)",
                                        "schema": {"type": "integer"}},
                    }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]

