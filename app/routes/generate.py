"""POST /generate and POST /generate/stream: thin HTTP over the engine."""

from __future__ import annotations

import dataclasses
from asyncio import sleep
from collections.abc import AsyncGenerator
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.sse import EventSourceResponse

from app.auth import Authorized
from app.deps import cancel_on_disconnect, compiled, model_for, version_headers
from app.errors import SHUT_DOWN, ApiError, refusal, shut_down_error
from app.registry import Served
from app.schemas import ERROR_RESPONSES, GenerateRequest, GenerateResponse
from app.sse import ServerSentEvent, sse_content, sse_response
from charlm.constraint import ConstraintError
from charlm.handles import Generation
from charlm.request import (
    EngineClosedError,
    GenerationFailed,
    GenerationRequest,
    GenerationResult,
    QueueFullError,
    RequestError,
)
from charlm.sampling import InvalidParameter, SamplingParams
from charlm.vocab import Vocab

router = APIRouter(tags=["generate"], dependencies=[Authorized], responses=ERROR_RESPONSES)


async def submitted(body: GenerateRequest, request: Request) -> tuple[Generation, Served]:
    """Submit to the model the body names before any response starts, so refusals are proper JSON
    errors even for streams."""
    metrics = request.app.state.metrics
    async with model_for(request, body.model) as served:
        try:
            constraint = await compiled(body.constraint, served.checkpoint.vocab)
        except ConstraintError as exc:
            raise refusal(RequestError(exc.param("constraint"), exc.message), metrics) from None
        try:
            return served.engine.submit(
                GenerationRequest(
                    seed=body.seed, length=body.length, random_seed=body.random_seed, stop=tuple(body.stop),
                    sampling=SamplingParams(body.scale_factor, body.top_k, body.top_p, min_p=body.min_p,
                                            logit_bias=bias_by_character(body.logit_bias, served.checkpoint.vocab),
                                            presence_penalty=body.presence_penalty,
                                            frequency_penalty=body.frequency_penalty,
                                            repetition_penalty=body.repetition_penalty),
                    timeout=request.app.state.settings.request_timeout, constraint=constraint,
                )
            ), served
        except (InvalidParameter, QueueFullError, EngineClosedError) as exc:
            raise refusal(exc, metrics) from None


def bias_by_character(bias: dict[str, float], vocab: Vocab) -> tuple[tuple[int, float], ...]:
    """The native API's logit_bias, keyed by characters, as vocabulary ids (a RequestError names a key
    that is not one character of the vocabulary)."""
    if len(bias) > len(vocab):  # before any lookup: the work stays bounded by the vocabulary
        raise RequestError("logit_bias", f"at most {len(vocab)} entries (the vocabulary's size), got {len(bias)}")
    if any(len(key) != 1 for key in bias):
        wrong = next(key for key in bias if len(key) != 1)
        raise RequestError("logit_bias", f"keys are single characters, got {wrong[:20]!r}")
    unknown = [key for key in bias if key not in vocab]
    if unknown:
        raise RequestError("logit_bias", f"characters not in the model's vocabulary: {unknown[:20]}", unknown)
    return tuple((int(vocab.encode(key)[0]), value) for key, value in bias.items())


Submitted = Annotated[tuple[Generation, Served], Depends(submitted)]


@router.post("/generate", response_model=GenerateResponse, summary="Continue a seed text")
async def generate(request: Request, response: Response, submission: Submitted) -> GenerateResponse:
    """The seed plus `length` sampled characters (fewer if a stop string or the timeout ends it),
    and the model and version that made them."""
    gen, served = submission
    response.headers.update(version_headers(served))
    watcher = cancel_on_disconnect(request, [gen])
    try:
        result = await gen.wait()
    except GenerationFailed as exc:
        raise ApiError(500, f"generation failed: {exc}") from None
    except EngineClosedError:
        raise shut_down_error() from None
    finally:
        watcher.cancel()
        gen.cancel()  # no-op when finished; frees the row if this handler itself was cancelled
    request.app.state.metrics.record(served.id, result)
    return GenerateResponse.model_validate(
        {**_fields(result), "model": served.id, "model_version": served.version}, from_attributes=True)


def _fields(result: GenerationResult) -> dict[str, object]:
    return {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}


STREAM_EXAMPLE = (
    'event: text\ndata: {"text": "T"}\n\nevent: text\ndata: {"text": "he engineer"}\n\n'
    'event: done\ndata: {"finish_reason": "length", "random_seed": 1, "usage": {...}, "timings": {...}}\n\n'
)


@router.post("/generate/stream", summary="Continue a seed text, streamed", responses={200: {
    "description": "Server-Sent Events: `text` events, then `done` (or `error`)",
    "content": sse_content(STREAM_EXAMPLE),
}})
async def generate_stream(request: Request, submission: Submitted) -> EventSourceResponse:
    """Server-Sent Events: `text` events as characters are sampled, then one `done` event
    (finish_reason, random_seed, usage, timings, model, model_version), or an `error` event if
    generation fails."""
    gen, served = submission
    return sse_response(_events(request, gen, served), headers=version_headers(served))


async def _events(request: Request, gen: Generation, served: Served) -> AsyncGenerator[ServerSentEvent, None]:
    # At most one text event per interval: the first character goes out at once, later ones in
    # pieces (smooth to a reader) instead of an event, a write and a wakeup per character, which
    # held 64 streams to ~2,000 characters/s in all.
    interval = request.app.state.settings.stream_interval_ms / 1000
    watcher = cancel_on_disconnect(request, [gen])
    try:
        async for chunk in gen:
            yield ServerSentEvent(data={"text": chunk}, event="text")
            if interval:
                await sleep(interval)  # what arrives meanwhile goes out as one event
        result = await gen.wait()
    except GenerationFailed as exc:
        yield ServerSentEvent(data={"error": {"type": "internal_error", "message": str(exc)}}, event="error")
        return
    except EngineClosedError:
        yield ServerSentEvent(data={"error": {"type": "not_ready", "message": SHUT_DOWN}}, event="error")
        return
    finally:
        watcher.cancel()
        gen.cancel()  # no-op when finished; frees the row when the client went away
    request.app.state.metrics.record(served.id, result)
    yield ServerSentEvent(
        data={"finish_reason": result.finish_reason, "random_seed": result.random_seed,
              "usage": dataclasses.asdict(result.usage), "timings": dataclasses.asdict(result.timings),
              "model": served.id, "model_version": served.version},
        event="done",
    )
