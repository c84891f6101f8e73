"""POST /generate and POST /generate/stream: thin HTTP over the engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent

from app.deps import Authorized, EngineDep
from app.errors import ApiError
from app.schemas import ERROR_RESPONSES, GenerateRequest, GenerateResponse
from charlm.engine import (
    EngineClosedError,
    Generation,
    GenerationFailed,
    GenerationRequest,
    GenerationResult,
    QueueFullError,
    RequestError,
)

router = APIRouter(tags=["generate"], dependencies=[Authorized], responses=ERROR_RESPONSES)


async def submitted(body: GenerateRequest, engine: EngineDep, request: Request) -> Generation:
    """Submit before any response starts, so refusals are proper JSON errors even for streams."""
    metrics = request.app.state.metrics
    try:
        return engine.submit(
            GenerationRequest(
                seed=body.seed, length=body.length, scale_factor=body.scale_factor, top_k=body.top_k,
                top_p=body.top_p, random_seed=body.random_seed, stop=tuple(body.stop),
                timeout=request.app.state.settings.request_timeout,
            )
        )
    except RequestError as exc:
        metrics.rejections.labels("invalid").inc()
        detail: dict[str, Any] = {"field": exc.field, "type": "value_error", "message": exc.message}
        if exc.chars:
            detail["unknown_characters"] = exc.chars
        raise ApiError(422, f"invalid request: {exc.field}", [detail]) from None
    except QueueFullError as exc:
        metrics.rejections.labels("queue_full").inc()
        raise ApiError(429, str(exc), headers={"Retry-After": "1"}) from None
    except EngineClosedError as exc:
        metrics.rejections.labels("shutting_down").inc()
        raise ApiError(503, str(exc), headers={"Retry-After": "1"}) from None


Submitted = Annotated[Generation, Depends(submitted)]


def _record(request: Request, result: GenerationResult) -> None:
    metrics = request.app.state.metrics
    metrics.chars.inc(result.usage["generated_chars"])
    metrics.finished.labels(result.finish_reason).inc()


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post("/generate", response_model=GenerateResponse, summary="Continue a seed text")
async def generate(request: Request, gen: Submitted) -> GenerateResponse:
    """The seed plus `length` sampled characters (fewer if a stop string or the timeout ends it)."""
    waiter = asyncio.ensure_future(gen.wait())
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not waiter.done():
            gen.cancel()  # the client is gone: free its row
    try:
        result = await waiter
    except GenerationFailed as exc:
        raise ApiError(500, f"generation failed: {exc}") from None
    _record(request, result)
    return GenerateResponse.model_validate(result, from_attributes=True)


@router.post("/generate/stream", response_class=EventSourceResponse, summary="Continue a seed text, streamed")
async def generate_stream(request: Request, gen: Submitted) -> AsyncIterator[ServerSentEvent]:
    """Server-Sent Events: `text` events as characters are sampled, then one `done` event
    (finish_reason, random_seed, usage, timings), or an `error` event if generation fails."""
    # At most one text event per interval: the first character goes out at once, later ones in
    # pieces (smooth to a reader) instead of an event, a write and a wakeup per character, which
    # held 64 streams to ~2,000 characters/s in all.
    interval = request.app.state.settings.stream_interval_ms / 1000
    try:
        async for chunk in gen:
            yield ServerSentEvent(data={"text": chunk}, event="text")
            if interval:
                await asyncio.sleep(interval)  # what arrives meanwhile goes out as one event
        result = await gen.wait()
    except GenerationFailed as exc:
        yield ServerSentEvent(data={"error": {"type": "internal_error", "message": str(exc)}}, event="error")
        return
    finally:
        gen.cancel()  # no-op when finished; frees the row when the client went away
    _record(request, result)
    yield ServerSentEvent(
        data={"finish_reason": result.finish_reason, "random_seed": result.random_seed, "usage": result.usage,
              "timings": result.timings},
        event="done",
    )
