"""Request and response bodies of the HTTP API, with the examples shown on /docs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from charlm.engine import DEFAULT_LENGTH, EngineLimits
from charlm.sampling import MAX_RANDOM_SEED, MAX_SCALE_FACTOR, MAX_TOP_K

_LIMITS = EngineLimits()  # the per-request rules that do not depend on the server's settings


class GenerateRequest(BaseModel):
    """Numbers are strict: `true` is not 1, and `5.0` is not a length."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"seed": "The island", "length": 500, "scale_factor": 2.0, "random_seed": 1}]
        },
    )

    seed: str = Field(min_length=1, description="start text; every character must be in the model's vocabulary")
    length: int = Field(DEFAULT_LENGTH, ge=1, strict=True,
                        description="characters to generate (the server's limit is max_length on /info)")
    scale_factor: float = Field(
        1.0, gt=0, le=MAX_SCALE_FACTOR, allow_inf_nan=False, strict=True,
        description="multiplies the logits: > 1 more predictable, < 1 more random (about 100 and above: "
        "always the most likely character)",
    )
    top_k: int | None = Field(None, ge=1, le=MAX_TOP_K, strict=True,
                              description="sample only among the k most likely characters (k >= the vocabulary "
                              "size: no filter)")
    top_p: float | None = Field(None, gt=0, le=1, strict=True,
                                description="sample from the smallest set reaching this probability")
    random_seed: int | None = Field(
        None, ge=0, le=MAX_RANDOM_SEED, strict=True,
        description="same request + same random_seed = same text; drawn and returned if absent",
    )
    stop: list[Annotated[str, Field(min_length=1, max_length=_LIMITS.max_stop_chars)]] = Field(
        default_factory=list, max_length=_LIMITS.max_stop,
        description="end early at the first of these strings (not included in the text)",
    )


class Usage(BaseModel):
    seed_chars: int
    generated_chars: int


class Timings(BaseModel):
    queue_ms: float
    prefill_ms: float
    generate_ms: float
    chars_per_s: float


class GenerateResponse(BaseModel):
    text: str = Field(description="seed + generated")
    generated: str
    finish_reason: Literal["length", "stop", "cancelled", "timeout"]
    random_seed: int
    usage: Usage
    timings: Timings


class ErrorBody(BaseModel):
    type: str
    message: str
    details: list[dict[str, Any]] = Field(default_factory=list)


class ErrorResponse(BaseModel):
    error: ErrorBody


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text, "content": {"application/json": {}}}
    for code, text in {
        400: "the body is not valid JSON",
        401: "missing or wrong API key",
        413: "request body too large",
        422: "invalid request: the field and the limit are named",
        429: "queue full; retry after the Retry-After seconds",
        503: "not ready (loading, warming up or shutting down)",
    }.items()
}
