"""Error responses. The native routes share one shape, {"error": {"type", "message", "details"}};
the OpenAI-compatible routes under /v1 answer in OpenAI's, {"error": {"message", "type", "param",
"code"}}, so that OpenAI's clients raise their usual exceptions (422 becomes 400 there, as OpenAI
answers a bad parameter).

Client input is never echoed back in full: validation details name the field and the rule only.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from app.budget import BudgetExhausted
from app.metrics import Metrics
from charlm.request import EngineClosedError, QueueFullError, RequestError, ScoringStopped
from charlm.sampling import InvalidParameter

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

# OpenAI's (type, code) for each status the service answers on /v1.
_OPENAI_TYPES: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "queue_full"),
    500: ("server_error", None),
    503: ("server_error", "not_ready"),
}

# A 422 names at most this many unknown characters (and says how many there were).
MAX_NAMED_CHARS = 20

OPENAI_PREFIX = "/v1"


class ApiError(Exception):
    """Raised by handlers for an error response in the shape of the route it was raised on. `param`
    and `code` fill OpenAI's fields on /v1 (the native shape names the field in `details`)."""

    def __init__(self, status: int, message: str, details: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None, param: str | None = None, code: str | None = None):
        self.status, self.message, self.details, self.headers = status, message, details or [], headers
        self.param, self.code = param, code


def is_openai_path(path: str) -> bool:
    return path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/")


def error_response(status: int, message: str, details: list[dict[str, Any]] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"type": _TYPES.get(status, "error"), "message": message, "details": details or []}}
    return JSONResponse(body, status_code=status, headers=headers)


def openai_error_body(status: int, message: str, param: str | None = None, code: str | None = None
                      ) -> dict[str, Any]:
    """OpenAI's error object for a status (its type, and a default code where the status implies one)."""
    kind, default_code = _OPENAI_TYPES.get(status, ("server_error" if status >= 500 else "invalid_request_error",
                                                    None))
    return {"error": {"message": message, "type": kind, "param": param, "code": code or default_code}}


def openai_error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                          headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error shape; a 422 is answered as 400, the status OpenAI gives an invalid parameter."""
    status = 400 if status == 422 else status
    return JSONResponse(openai_error_body(status, message, param, code), status_code=status, headers=headers)


def error_response_for(path: str, status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error with no field to name, in the shape of the route at `path`."""
    if is_openai_path(path):
        return openai_error_response(status, message, headers=headers)
    return error_response(status, message, headers=headers)


# What a client whose request was cut off by a shutdown is told (native routes, /score and /v1 alike).
SHUT_DOWN = "the server shut down before this request finished; retry on another replica or later"


def shut_down_error() -> ApiError:
    """A queued request the engine ended by shutting down: 503, to retry elsewhere or later."""
    return ApiError(503, SHUT_DOWN, headers={"Retry-After": "1"})


def refusal(exc: InvalidParameter | QueueFullError | EngineClosedError, metrics: Metrics) -> ApiError:
    """A request the engine would not queue, as the native routes answer it (and counted): 422 naming
    the field and the rule, or the queue's 429/503."""
    if isinstance(exc, InvalidParameter):
        metrics.rejections.labels("invalid").inc()
        return ApiError(422, f"invalid request: {exc.field}: {exc.message}", [request_error_detail(exc)],
                        param=exc.field)
    return queue_refusal(exc, metrics)


def queue_refusal(exc: QueueFullError | EngineClosedError, metrics: Metrics) -> ApiError:
    """The engine would not queue the request: full (429) or closing (503), both to retry; counted."""
    full = isinstance(exc, QueueFullError)
    metrics.rejections.labels("queue_full" if full else "shutting_down").inc()
    return ApiError(429 if full else 503, str(exc), headers={"Retry-After": "1"})


def budget_refusal(exc: BudgetExhausted, metrics: Metrics) -> ApiError:
    """The server holds its limit of log-probabilities for unread responses: 429, to retry; counted."""
    metrics.rejections.labels("logprob_budget").inc()
    return ApiError(429, str(exc), headers={"Retry-After": "1"})


def scoring_stopped_error(exc: ScoringStopped, field: str) -> ApiError:
    """Scoring a text ran past the request timeout. Once the text had started, the same text would
    run past it again, so that is not a retryable 503: it says to send less (422 on the native routes,
    400 on /v1). Before it started, the time went on waiting: the server is busy, and 503 says retry."""
    if not exc.started:
        return ApiError(503, "the server was too busy to score this text within its request timeout; retry",
                        headers={"Retry-After": "1"})
    return ApiError(422, "scoring this text did not finish within the server's request timeout; score a shorter "
                    "text (or ask the operator to raise CHARLM_REQUEST_TIMEOUT)", param=field,
                    details=[{"field": field, "type": "timeout", "message": "too long to score in time"}])


def request_error_detail(exc: InvalidParameter) -> dict[str, Any]:
    """The field and the rule; unknown characters named, but never more than MAX_NAMED_CHARS."""
    detail: dict[str, Any] = {"field": exc.field, "type": "value_error", "message": exc.message}
    if isinstance(exc, RequestError) and exc.chars:
        detail["unknown_characters"] = exc.chars[:MAX_NAMED_CHARS]
        detail["unknown_count"] = len(exc.chars)
    return detail


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


# Parameters that are objects of named fields: an error names the field too (structured_outputs.regex).
_OBJECT_PARAMS = {"structured_outputs"}


def _openai_param(err: dict[str, Any]) -> str | None:
    """The request parameter an error is about: the first key of its location in the body (and the
    field within it, for the object parameters)."""
    loc = [p for p in err.get("loc", ()) if p != "body"]
    if not loc or not isinstance(loc[0], str):
        return None
    if loc[0] in _OBJECT_PARAMS and len(loc) > 1 and isinstance(loc[1], str):
        return f"{loc[0]}.{loc[1]}"
    return loc[0]


def openai_validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One message for OpenAI's shape, naming the parameter and the rule (never the value), and the
    parameter itself; further errors are counted and named."""
    if not errors:
        return "invalid request", None
    param = _openai_param(errors[0])
    # A value checked against several types (prompt, stop) fails each: the rule of the type it has
    # (a list too long) says more than "not a string".
    same = [e for e in errors if _openai_param(e) == param]
    first = next((e for e in same if not str(e.get("type", "")).endswith("_type")), same[0])
    kind = first.get("type")
    if kind == "extra_forbidden" and param:
        message = f"Unrecognized request argument supplied: {param}"
    elif kind == "missing" and param:
        message = f"Missing required parameter: '{param}'"
    elif kind == "json_invalid":
        message = ("We could not parse the JSON body of your request: send a JSON object "
                   "(Content-Type: application/json)")
    elif param:
        message = f"Invalid value for '{param}': {first.get('msg')}"
    else:
        message = f"Invalid request body: {first.get('msg')}"
    others = sorted({p for p in map(_openai_param, errors[1:]) if p and p != param})
    if others:
        message += f" (also invalid: {', '.join(others[:10])})"
    return message, param
