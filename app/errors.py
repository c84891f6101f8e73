"""One JSON error shape for every error: {"error": {"type", "message", "details"}}.

Client input is never echoed back in full: validation details name the field and the rule only.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    422: "validation_error",
    429: "queue_full",
    500: "internal_error",
    503: "not_ready",
}


class ApiError(Exception):
    """Raised by handlers for an error response in the common shape."""

    def __init__(self, status: int, message: str, details: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None):
        self.status, self.message, self.details, self.headers = status, message, details or [], headers


def error_response(status: int, message: str, details: list[dict[str, Any]] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"type": _TYPES.get(status, "error"), "message": message, "details": details or []}}
    return JSONResponse(body, status_code=status, headers=headers)


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def validation_details(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pydantic errors without their 'input' (which may be huge): field, rule, message, limit."""
    details = []
    for err in errors[:20]:
        item: dict[str, Any] = {"field": _field(err.get("loc", ())), "type": err.get("type"), "message": err.get("msg")}
        ctx = {k: v for k, v in (err.get("ctx") or {}).items() if isinstance(v, (int, float, str))}
        if ctx:
            item["limit"] = {k: (v if not isinstance(v, str) else v[:100]) for k, v in ctx.items()}
        details.append(item)
    return details


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        from app.deps import check_api_key_first  # deps imports this module

        try:
            await check_api_key_first(request)
        except ApiError as denied:
            return error_response(denied.status, denied.message, headers=denied.headers)
        details = validation_details(list(exc.errors()))
        fields = ", ".join(sorted({d["field"] for d in details}))
        return error_response(422, f"invalid request: {fields}", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}")
