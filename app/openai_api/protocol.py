"""Request and response bodies of the OpenAI-compatible routes (/v1), field for field as OpenAI's
legacy completions API, with the examples shown on /docs. A character is a token here.

Requests are validated as OpenAI validates them: unknown fields are refused (400 naming the field),
numbers are strict (`true` is not 1), ranges are OpenAI's where it has them and this server's
limits (on /info) where it does not.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.schemas import StructuredOutputs
from charlm.request import MAX_LOGPROBS, EngineLimits
from charlm.sampling import MAX_RANDOM_SEED

_LIMITS = EngineLimits()

MAX_N = 128  # OpenAI's own bound on n; the server's max_choices (on /info) is usually lower
MAX_STOP = _LIMITS.max_stop

StrictInt = Annotated[int, Field(strict=True)]
TokenId = Annotated[int, Field(strict=True, ge=0)]
StopString = Annotated[str, Field(min_length=1, max_length=_LIMITS.max_stop_chars)]

COMPLETION_EXAMPLES: list[Any] = [
    {"model": "mysterious_island", "prompt": "The island", "max_tokens": 200, "temperature": 0.5, "seed": 1},
    {"model": "mysterious_island", "prompt": "The engineer", "max_tokens": 100, "temperature": 0},
    {"model": "mysterious_island", "prompt": "The island was", "max_tokens": 0, "echo": True, "logprobs": 2},
]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = Field(None, strict=True,
                                       description="a last chunk with `usage` (and no choices) before [DONE]")


class CompletionRequest(BaseModel):
    """OpenAI's legacy completions request. Parameters this model cannot honour are refused with a 400
    naming them (`suffix`, `best_of` other than n, `logit_bias`, non-zero penalties), never ignored."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": COMPLETION_EXAMPLES})

    model: str = Field(min_length=1, max_length=512, description="the model's id, as GET /v1/models lists it")
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        description="the start text, or a list of them (one set of n choices each); token ids are "
        "vocabulary ids, one per character"
    )
    suffix: str | None = Field(None, description="not supported: a non-empty suffix is refused")
    max_tokens: int | None = Field(16, ge=0, strict=True,
                                   description="characters to generate (0 with echo: only the prompt); at most "
                                   "max_length on /info")
    temperature: float | None = Field(1.0, ge=0, le=2, allow_inf_nan=False, strict=True,
                                      description="1/scale_factor; 0 is greedy (always the most likely character)")
    top_p: float | None = Field(1.0, ge=0, le=1, allow_inf_nan=False, strict=True,
                                description="nucleus sampling; 0 is greedy")
    n: int | None = Field(1, ge=1, le=MAX_N, strict=True,
                          description="choices per prompt (they share the prompt's prefill); prompts x n at most "
                          "max_choices on /info")
    stream: bool | None = Field(False, strict=True, description="Server-Sent Events: `data: {chunk}` ... "
                                "`data: [DONE]`")
    stream_options: StreamOptions | None = Field(None, description="only with stream")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, strict=True,
                                 description="log-probability of each character and of this many alternatives")
    echo: bool | None = Field(False, strict=True, description="the prompt before the completion (with logprobs: "
                              "scored, the first character null)")
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = Field(
        None, description=f"a string or up to {MAX_STOP} strings; generation ends before the first that appears"
    )
    presence_penalty: float | None = Field(0.0, ge=-2, le=2, allow_inf_nan=False, strict=True,
                                           description="subtracted from the logit of each character generated so far")
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2, allow_inf_nan=False, strict=True,
                                            description="times each character's count so far, subtracted from its "
                                            "logit (characters are tokens: it pushes down `e` and the space first)")
    best_of: int | None = Field(None, ge=1, le=MAX_N, strict=True, description="supported only equal to n")
    logit_bias: dict[str, float] | None = Field(None, description="token ids (a character's index in the vocabulary, "
                                                "as /tokenize gives it) -> bias in [-100, 100]; -100 bans one")
    # vLLM's sampling parameters (the openai SDK sends them with extra_body)
    repetition_penalty: float | None = Field(None, gt=0, le=100, allow_inf_nan=False, strict=True,
                                             description="vLLM's: the logits of characters in the prompt or "
                                             "generated are divided by it when positive, multiplied when negative")
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False, strict=True,
                                description="vLLM's: keep only characters at least this times as likely as the top")
    structured_outputs: StructuredOutputs | None = Field(None, description="vLLM's: what the text must match, "
                                                         "exactly: {regex}, {choice} or {json}")
    seed: int | None = Field(None, ge=0, le=MAX_RANDOM_SEED, strict=True,
                             description="same request + same seed = same text, alone or among other requests")
    user: str | None = Field(None, description="accepted and ignored (the body limit bounds it)")


class Logprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int] = Field(description="each character's offset in prompt + completion, as OpenAI counted")


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: Logprobs | None
    finish_reason: Literal["stop", "length"] | None = Field(
        description="null only in a stream's chunks before the last of the choice"
    )


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "cmpl-3f1c0e9a5b7d4e2f8a6c1b0d9e8f7a6b", "object": "text_completion", "created": 1764531200,
        "model": "mysterious_island",
        "choices": [{"text": " was deserted", "index": 0, "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 13, "total_tokens": 23},
        "system_fingerprint": "fp_5f0c1e2a9b7d",
    }]})

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None
    system_fingerprint: str | None = None


class Model(BaseModel):
    """OpenAI's model object, with what a client needs to choose one (OpenAI's clients keep the extra
    fields: `model.status`, `model.bits_per_char`...)."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"id": "mysterious_island", "object": "model", "created": 1764531200, "owned_by": "charlm",
         "status": "loaded", "default": True, "version": "5f0c1e2a9b7d", "parameters": 3477600,
         "bits_per_char": 1.515, "error": None}
    ]})

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    status: Literal["loaded", "available", "unavailable"] = Field(
        description="loaded: in memory; available: loads on its first request; unavailable: does not load (see error)")
    default: bool = Field(description="the model a request without `model` gets")
    version: str | None = Field(description="the loaded weights' version (their file's sha256, first 12 digits)")
    parameters: int | None = Field(description="learnt parameters: a measure of its size and speed")
    bits_per_char: float | None = Field(description="held-out bits per character when it was trained: lower is better")
    error: str | None = Field(description="why it does not load, when it does not")


class ModelList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"object": "list", "data": [
        {"id": "mysterious_island", "object": "model", "created": 1764531200, "owned_by": "charlm",
         "status": "loaded", "default": True, "version": "5f0c1e2a9b7d", "parameters": 3477600,
         "bits_per_char": 1.515, "error": None}
    ]}]})

    object: Literal["list"] = "list"
    data: list[Model]


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"error": {
        "message": "suffix is not supported by this model: send no suffix (or an empty one)",
        "type": "invalid_request_error", "param": "suffix", "code": "unsupported_parameter",
    }}]})

    error: OpenAIErrorBody


OPENAI_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIErrorResponse, "description": text, "content": {"application/json": {}}}
    for code, text in {
        400: "invalid request: `param` names the parameter (also malformed JSON and unsupported parameters)",
        401: "missing or wrong API key (send Authorization: Bearer <key>)",
        404: "no such model (`code`: model_not_found)",
        413: "request body too large",
        429: "queue full; retry after the Retry-After seconds",
        503: "not ready (loading, warming up or shutting down)",
    }.items()
}
