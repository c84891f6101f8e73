"""Request and response bodies of the HTTP API, with the examples shown on /docs."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict

from charlm.constraint import MAX_CHOICES, MAX_PATTERN_CHARS, Constraint, ConstraintError
from charlm.request import DEFAULT_LENGTH, MAX_LOGPROBS, EngineLimits
from charlm.sampling import MAX_RANDOM_SEED, MAX_SCALE_FACTOR, MAX_TOP_K

_LIMITS = EngineLimits()  # the per-request rules that do not depend on the server's settings


class StructuredOutputs(BaseModel):
    """What the generated text must match, exactly (vLLM's `structured_outputs`; one of the three)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    regex: str | None = Field(None, max_length=MAX_PATTERN_CHARS, description="a regular expression (Rust syntax, "
                              "as vLLM's backends take it) the whole generated text must match")
    choice: list[str] | None = Field(None, max_length=MAX_CHOICES, description="the text is one of these strings, "
                                     "picked with the model's probability of each")
    json_schema: dict[str, Any] | str | None = Field(None, alias="json", description="a JSON schema the text must "
                                                     "follow (the model's vocabulary must hold JSON's characters)")
    grammar: str | None = Field(None, description="vLLM's context-free grammar: not supported (refused, naming it)")

    def constraint(self) -> Constraint:
        """The one constraint given, checked for size; ConstraintError names the field."""
        if self.grammar is not None:
            raise ConstraintError("grammar", "is not supported: charlm's structured-output library (outlines-core) "
                                  "has no context-free grammars; use regex, choice or json")
        given = {k: v for k, v in (("regex", self.regex), ("choice", self.choice), ("json", self.json_schema))
                 if v is not None}
        if len(given) != 1:
            raise ConstraintError("constraint", f"give exactly one of regex, choice or json (got {len(given)})")
        [(kind, value)] = given.items()
        if kind == "json" and isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ConstraintError("json", "is not valid JSON") from None
        return Constraint.of(kind, value)  # type: ignore[arg-type]


class GenerateRequest(BaseModel):
    """Numbers are strict: `true` is not 1, and `5.0` is not a length."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"seed": "The island", "length": 500, "scale_factor": 2.0, "random_seed": 1}]
        },
    )

    model: str | None = Field(None, max_length=1000, description="the model's id (GET /v1/models lists them); "
                              "default: the server's default model")
    seed: str = Field(min_length=1, description="start text; every character must be in the model's vocabulary")
    length: int = Field(DEFAULT_LENGTH, ge=1, strict=True,
                        description="characters to generate (the server's limit is max_length on /info)")
    # The sampling settings' ranges are SamplingParams' (charlm/sampling.py) to check, in one place;
    # they are stated here only so that the API page shows them.
    scale_factor: float = Field(
        1.0, strict=True, json_schema_extra={"exclusiveMinimum": 0, "maximum": MAX_SCALE_FACTOR},
        description="multiplies the logits: > 1 more predictable, < 1 more random (about 100 and above: "
        "always the most likely character)",
    )
    top_k: Annotated[int, Field(strict=True, json_schema_extra={"minimum": 1, "maximum": MAX_TOP_K})] | None = Field(
        None, description="sample only among the k most likely characters (k >= the vocabulary size: no filter)")
    top_p: Annotated[float, Field(strict=True, json_schema_extra={"exclusiveMinimum": 0, "maximum": 1})] | None = (
        Field(None, description="sample from the smallest set reaching this probability"))
    random_seed: int | None = Field(
        None, ge=0, le=MAX_RANDOM_SEED, strict=True,
        description="same request + same random_seed = same text; drawn and returned if absent",
    )
    stop: list[Annotated[str, Field(min_length=1, max_length=_LIMITS.max_stop_chars)]] = Field(
        default_factory=list, max_length=_LIMITS.max_stop,
        description="end early at the first of these strings (not included in the text)",
    )
    # Steering (charlm/steering.py says in which order); ranges checked by SamplingParams, as above.
    logit_bias: dict[str, Annotated[float, Field(strict=True)]] = Field(
        default_factory=dict, description="characters -> bias in [-100, 100] added to their logits (-100 bans "
        "one), at most the vocabulary's size of them", json_schema_extra={"example": {"e": -100}})
    presence_penalty: float = Field(0.0, strict=True, json_schema_extra={"minimum": -2, "maximum": 2},
                                    description="subtracted from the logit of every character generated so far")
    frequency_penalty: float = Field(0.0, strict=True, json_schema_extra={"minimum": -2, "maximum": 2},
                                     description="times each character's count so far, subtracted from its logit "
                                     "(characters are tokens: it pushes down `e` and the space first)")
    repetition_penalty: float = Field(1.0, strict=True, json_schema_extra={"exclusiveMinimum": 0, "maximum": 100},
                                      description="vLLM's: the logits of characters in the seed or generated are "
                                      "divided by it when positive, multiplied when negative (1: off)")
    min_p: float = Field(0.0, strict=True, json_schema_extra={"minimum": 0, "maximum": 1},
                         description="keep only characters at least this times as likely as the most likely one")
    constraint: StructuredOutputs | None = Field(None, description="what the generated text must match, exactly: "
                                                 "{regex}, {choice} or {json}")


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
    model: str = Field(description="the model that made the text")
    model_version: str = Field(description="its version: the start of its file's sha256")


class ScoreRequest(BaseModel):
    """A text to score; numbers are strict, as everywhere."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"text": "The engineer looked at the sea.", "top_k": 3}]},
    )

    model: str | None = Field(None, max_length=1000, description="the model's id (GET /v1/models lists them); "
                              "default: the server's default model")
    text: str = Field(min_length=2, description="the text to score: at least 2 characters (the first is the context "
                      "the second is predicted from), at most max_score_chars on /info, all in the vocabulary")
    top_k: int = Field(0, ge=0, le=MAX_LOGPROBS, strict=True,
                       description="the most likely alternatives listed for each character")
    per_char: bool = Field(True, strict=True, description="list every character with its log-probability "
                           "(false: only the totals)")


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize body (the completion form); numbers and flags strict, as everywhere."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"prompt": "The island"}]})

    model: str | None = Field(None, max_length=1000, description="the model's id; default: the server's default model")
    prompt: str = Field(description="the text to split into tokens (characters)")
    add_special_tokens: bool = Field(True, strict=True, description="accepted for vLLM's clients: charlm's "
                                     "vocabulary has no special tokens, so it changes nothing")
    return_token_strs: bool = Field(False, strict=True, description="also list each token's text")


class TokenizeResponse(BaseModel):
    count: int = Field(description="how many tokens: the prompt's characters")
    max_model_len: int = Field(description="the longest seed this server takes, in characters")
    tokens: list[int] = Field(description="each character's index in the model's vocabulary")
    token_strs: list[str] | None = Field(None, description="each token's character, when asked for")


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"tokens": [45, 60, 57]}]})

    model: str | None = Field(None, max_length=1000, description="the model's id; default: the server's default model")
    tokens: list[Annotated[int, Strict()]] = Field(description="vocabulary ids, each from 0 to the vocabulary's "
                                                   "size - 1")


class DetokenizeResponse(BaseModel):
    prompt: str = Field(description="the characters the tokens name")


class TopChar(BaseModel):
    char: str
    logprob: float


class CharScore(BaseModel):
    char: str
    logprob: float | None = Field(description="natural log of the probability the model gave this character "
                                  "after the ones before it; null for the first, which nothing predicts")
    top: list[TopChar] = Field(description="the top_k most likely characters at this position, most likely first")


class ScoreTimings(BaseModel):
    queue_ms: float
    score_ms: float


class ScoreResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "bits_per_char": 2.31, "chars": 2, "logprob": -3.2021,
        "per_char": [
            {"char": "T", "logprob": None, "top": []},
            {"char": "h", "logprob": -0.8512, "top": [{"char": "h", "logprob": -0.8512}]},
            {"char": "e", "logprob": -2.3509, "top": [{"char": "o", "logprob": -0.4197}]},
        ],
        "timings": {"queue_ms": 0.2, "score_ms": 3.1}, "model": "mysterious_island", "model_version": "5f0c1e2a9b7d",
    }]})

    bits_per_char: float = Field(description="-logprob / chars / ln 2: what `charlm eval` reports as bpc")
    chars: int = Field(description="characters predicted: all but the first")
    logprob: float = Field(description="their summed log-probability, in nats")
    per_char: list[CharScore] | None = Field(description="every character of the text, in order (with per_char)")
    timings: ScoreTimings
    model: str = Field(description="the model that scored the text")
    model_version: str = Field(description="its version: the start of its file's sha256")


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
        404: "no such model: the models there are are listed",
        503: "not ready (loading, warming up or shutting down), or the model does not load",
    }.items()
}
