"""POST /score: how likely the model finds a given text, character by character."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from app.auth import Authorized
from app.budget import Lease
from app.deps import cancel_on_disconnect, logprob_lease, model_for, version_headers
from app.errors import (
    ApiError,
    refusal,
    scoring_stopped_error,
    shut_down_error,
)
from app.registry import Served
from app.schemas import ERROR_RESPONSES, ScoreRequest, ScoreResponse
from charlm.engine import Engine
from charlm.handles import Scoring
from charlm.request import EngineClosedError, GenerationFailed, QueueFullError, ScoreResult, ScoringStopped
from charlm.request import ScoreRequest as ScoreJob
from charlm.sampling import InvalidParameter

router = APIRouter(tags=["score"], dependencies=[Authorized], responses=ERROR_RESPONSES)


def submit_score(engine: Engine, request: Request, text: str, top_k: int) -> Scoring:
    """Queue a scoring job; refusals as ApiError (the field named, unknown characters listed but capped)."""
    metrics = request.app.state.metrics
    try:
        return engine.score(ScoreJob(text, top_k, timeout=request.app.state.settings.request_timeout))
    except (InvalidParameter, QueueFullError, EngineClosedError) as exc:
        raise refusal(exc, metrics) from None


async def scored(request: Request, scoring: Scoring) -> ScoreResult:
    """Wait for a scoring job, cancelling it if the client goes; engine outcomes as ApiError."""
    watcher = cancel_on_disconnect(request, [scoring])
    try:
        return await scoring.wait()
    except ScoringStopped as exc:
        raise scoring_stopped_error(exc, "text") from None
    except GenerationFailed as exc:
        raise ApiError(500, f"scoring failed: {exc}") from None
    except EngineClosedError:
        raise shut_down_error() from None
    finally:
        watcher.cancel()
        scoring.cancel()  # no-op when finished; frees the engine's work if this handler was cancelled


@router.post("/score", response_model=ScoreResponse, summary="Score a text: bits per character and per-character "
             "log-probabilities")
async def score(body: ScoreRequest, request: Request) -> StreamingResponse:
    """Each character after the first, predicted from all the characters before it, with the state
    carried over the whole text, as `charlm eval` computes held-out bpc (and with the same result).
    The first character is context only: the model has no start-of-text token to predict it from.
    Long texts are scored in chunks between other requests' decode steps, so they never stall them."""
    lease = logprob_lease(request, len(body.text) * (1 + body.top_k) if body.per_char else 0)
    try:
        async with model_for(request, body.model) as served:
            scoring = submit_score(served.engine, request, body.text, body.top_k)
        result = await scored(request, scoring)
    except BaseException:
        lease.release()
        raise
    # Written as the client reads it, and the share held until then (app/budget.py).
    return StreamingResponse(_body(result, body.per_char, lease, served), media_type="application/json",
                             background=BackgroundTask(lease.release), headers=version_headers(served))


# Per-character entries encoded per piece of the body: small enough that a piece never holds the loop.
ENTRIES_PER_PIECE = 1000


async def _body(result: ScoreResult, per_char: bool, lease: Lease, served: Served) -> AsyncIterator[bytes]:
    try:
        head = {"bits_per_char": result.bits_per_char, "chars": result.chars, "logprob": result.logprob,
                "timings": {"queue_ms": result.queue_ms, "score_ms": result.score_ms},
                "model": served.id, "model_version": served.version}
        yield json.dumps(head, separators=(",", ":"))[:-1].encode()
        if not per_char:
            yield b',"per_char":null}'
            return
        for start in range(0, len(result.per_char), ENTRIES_PER_PIECE):
            piece = [{"char": e.char, "logprob": e.logprob, "top": [{"char": c, "logprob": lp} for c, lp in e.top]}
                     for e in result.per_char[start : start + ENTRIES_PER_PIECE]]
            yield ((',"per_char":[' if start == 0 else ",") + json.dumps(piece, separators=(",", ":"))[1:-1]).encode()
            await asyncio.sleep(0)
        yield b"]}"
    finally:
        lease.release()
