"""Errors of the public API, all ``application/problem+json``: ``{type, title, status, detail, code}``
(RFC 9457) plus ``errors: [{field, message}]`` for invalid input."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import msgspec
from starlette.responses import Response

from services.intake.errors import (
    ClientOrderIdConflict,
    ConcurrentUpdate,
    EventStoreUnavailable,
    IntakeError,
    InvalidOrder,
    PortfolioNotFound,
)

__all__ = ["PROBLEM_JSON", "FieldError", "Problem", "ProblemBody", "problem_of", "problem_response"]

PROBLEM_JSON = "application/problem+json"


class FieldError(msgspec.Struct, frozen=True):
    field: str
    message: str


class ProblemBody(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An error: ``code`` is the machine-readable reason, stable across versions."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    errors: list[FieldError] | None = None


class Problem(Exception):
    """Raised anywhere in a request; answered as problem+json."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        errors: list[FieldError] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}

    @classmethod
    def invalid(cls, field: str, message: str) -> Problem:
        return cls(422, "validation_error", f"{field}: {message}", errors=[FieldError(field, message)])


def problem_of(exc: IntakeError) -> Problem:
    """The answer to an error of the intake (``services.intake.errors``): the one place they
    become problems."""
    if isinstance(exc, InvalidOrder):
        return Problem.invalid(exc.field, exc.message)
    if isinstance(exc, PortfolioNotFound):
        p = exc.portfolio_id
        if not exc.for_order:
            return Problem(404, "portfolio_not_found", f"portfolio {p} does not exist")
        return Problem(404, "portfolio_not_found", f"portfolio {p} does not exist (create it with PUT /v1/portfolios/{p})")
    if isinstance(exc, ClientOrderIdConflict):
        return Problem(
            409, "client_order_id_conflict",
            f"client_order_id {exc.client_order_id} was already used for a different order",
        )
    if isinstance(exc, ConcurrentUpdate):
        return Problem(409, "concurrent_update", "the portfolio kept changing; try again")
    if isinstance(exc, EventStoreUnavailable):
        return Problem(503, "event_store_unavailable", exc.detail)
    raise TypeError(f"no problem for {type(exc).__name__}") from exc


_encode = msgspec.json.Encoder().encode


def problem_response(
    status: int, code: str, detail: str, *, errors: list[FieldError] | None = None, headers: dict[str, str] | None = None
) -> Response:
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body = ProblemBody(type=f"/problems/{code}", title=title, status=status, detail=detail, code=code, errors=errors)
    try:
        content = _encode(body)
    except UnicodeEncodeError:
        # a lone surrogate from the request in the detail or a field name: still the 4xx, escaped
        body = ProblemBody(
            type=body.type, title=title, status=status, detail=_utf8(detail), code=code,
            errors=None if errors is None else [FieldError(_utf8(e.field), _utf8(e.message)) for e in errors],
        )
        content = _encode(body)
    return Response(content, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _utf8(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def from_problem(exc: Problem) -> Response:
    return problem_response(exc.status, exc.code, exc.detail, errors=exc.errors, headers=exc.headers)


def field_of(location: Any) -> str:
    """A dotted field name from a validation location (``("body", "limits", "x")``)."""
    parts = [str(p) for p in location if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"
