"""The exception handlers: every error the app raises, or FastAPI raises for it, in the shape of its
route (app/errors.py). A caller without the API key hears 401 before anything about its request."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.auth import check_api_key_first
from app.errors import (
    ApiError,
    error_response,
    error_response_for,
    is_openai_path,
    openai_error_response,
    openai_validation_message,
    validation_details,
)

# FastAPI's 400 when a body cannot be read at all (not UTF-8, say), said more usefully.
BODY_UNREADABLE = ("the request body could not be parsed: send a JSON object, UTF-8 encoded "
                   "(Content-Type: application/json)")


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        if is_openai_path(request.url.path):
            param = exc.param or (exc.details[0].get("field") if exc.details else None)
            return openai_error_response(exc.status, exc.message, param, exc.code, exc.headers)
        return error_response(exc.status, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        if denied := await _unauthorized(request):
            return denied
        errors = list(exc.errors())
        if is_openai_path(request.url.path):
            message, param = openai_validation_message(errors)
            return openai_error_response(400, message, param)
        details = validation_details(errors)
        fields = ", ".join(sorted({d["field"] for d in details}))
        return error_response(422, f"invalid request: {fields}", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and (denied := await _unauthorized(request)):
            return denied  # a body that does not even parse: who sends it comes first
        headers = getattr(exc, "headers", None)
        message = BODY_UNREADABLE if exc.status_code == 400 else str(exc.detail)
        if is_openai_path(request.url.path):
            if exc.status_code == 404:
                message = f"Invalid URL ({request.method} {request.url.path}): no such route"
            return openai_error_response(exc.status_code, message, headers=headers)
        return error_response(exc.status_code, message, headers=headers)

    async def _unauthorized(request: Request) -> JSONResponse | None:
        """The 401 a caller without the key gets before anything is said about its body, else None."""
        try:
            await check_api_key_first(request)
        except ApiError as denied:
            return await _api_error(request, ApiError(denied.status, denied.message, headers=denied.headers))
        return None

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response_for(request.url.path, 500, f"internal error: {type(exc).__name__}")
