"""POST /score: how likely the model finds a given text, character by character."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.auth import Authorized
from app.budget import BudgetExhausted, Lease
from app.deps import EngineDep, cancel_on_disconnect
from app.errors import (
    ApiError,
    budget_refusal,
    refusal,
    scoring_timeout_error,
    shut_down_error,
)
from app.schemas import ERROR_RESPONSES, ScoreRequest, ScoreResponse
from charlm.handles import Scoring
from charlm.request import EngineClosedError, GenerationFailed, QueueFullError, ScoreResult, ScoringStopped
from charlm.request import ScoreRequest as ScoreJob
from charlm.sampling import InvalidParameter

router = APIRouter(tags=["score"], dependencies=[Authorized], responses=ERROR_RESPONSES)


def submit_score(engine: EngineDep, request: Request, text: str, top_k: int) -> Scoring:
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
    except ScoringStopped:
        raise scoring_timeout_error("text") from None
    except GenerationFailed as exc:
        raise ApiError(500, f"scoring failed: {exc}") from None
    except EngineClosedError:
        raise shut_down_error() from None
    finally:
        watcher.cancel()
        scoring.cancel()  # no-op when finished; frees the engine's work if this handler was cancelled


def _lease(request: Request, values: int) -> Lease:
    """The scoring's share of the server's bound on held log-probabilities (app/budget.py)."""
    try:
        return request.app.state.logprob_budget.take(values)
    except BudgetExhausted as exc:
        raise budget_refusal(exc, request.app.state.metrics) from None


@router.post("/score", response_model=ScoreResponse, summary="Score a text: bits per character and per-character "
             "log-probabilities")
async def score(body: ScoreRequest, request: Request, engine: EngineDep) -> JSONResponse:
    """Each character after the first, predicted from all the characters before it, with the state
    carried over the whole text, as `charlm eval` computes held-out bpc (and with the same result).
    The first character is context only: the model has no start-of-text token to predict it from.
    Long texts are scored in chunks between other requests' decode steps, so they never stall them."""
    lease = _lease(request, len(body.text) * (1 + body.top_k))
    try:
        result = await scored(request, submit_score(engine, request, body.text, body.top_k))
    finally:
        lease.release()  # the result is turned into the response below, without waiting for the client
    per_char = None
    if body.per_char:  # plain dicts: a model object per character would cost more than the scoring's chunks
        per_char = [{"char": e.char, "logprob": e.logprob, "top": [{"char": c, "logprob": lp} for c, lp in e.top]}
                    for e in result.per_char]
    return JSONResponse({
        "bits_per_char": result.bits_per_char, "chars": result.chars, "logprob": result.logprob, "per_char": per_char,
        "timings": {"queue_ms": result.queue_ms, "score_ms": result.score_ms},
    })
