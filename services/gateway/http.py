"""Request plumbing the routes share: JSON answers, the body read under its limit, query flags."""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import Request
from starlette.responses import Response

from services.gateway.problems import Problem

__all__ = ["JSON", "MAX_WAIT_S", "json_response", "parse_flag", "parse_wait", "read_body"]

MAX_WAIT_S = 30.0
JSON = "application/json"
_json = msgspec.json.Encoder().encode


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_json(body), status_code=status, media_type=JSON, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 when it is over ``limit`` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Problem(413, "payload_too_large", f"the body is over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem(413, "payload_too_large", f"the body is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_flag(raw: str, name: str) -> bool:
    value = raw.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no", ""):
        return False
    raise Problem.invalid(name, "must be true or false")


def parse_wait(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        wait = float(raw)
    except ValueError:
        raise Problem.invalid("wait", "must be a number of seconds") from None
    if not 0 < wait <= MAX_WAIT_S:
        raise Problem.invalid("wait", f"must be above 0 and at most {MAX_WAIT_S:g} seconds")
    return wait

