"""What routes share: readiness, the model a request names (loaded for it), the log-probability budget,
cancelling on disconnect."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from app.budget import BudgetExhausted, Lease
from app.errors import ApiError, budget_refusal
from app.registry import ModelBusy, ModelRegistry, ModelUnavailable, Served, UnknownModel
from app.schemas import StructuredOutputs
from charlm.constraint import CompiledConstraint, compile_constraint
from charlm.handles import Handle
from charlm.vocab import Vocab


def not_ready_reason(state: Any) -> str | None:
    """Why the service cannot take work now, or None: the one readiness rule for /ready, /info and routes."""
    if state.draining:
        return "shutting down"
    if not state.ready:
        return "the models are still loading"
    return None


@asynccontextmanager
async def model_for(request: Request, model_id: str | None) -> AsyncIterator[Served]:
    """The model a request names (the default when None), loaded if need be (the wait counts in the
    request's queue time) and pinned while the block submits its work. Errors in the route's shape:
    404 for an unknown model (the ids there are listed), 503 while not ready, for a model that does
    not load (the checkpoint's own error), or while there is no room to load it."""
    reason = not_ready_reason(request.app.state)
    if reason:
        raise ApiError(503, f"not ready: {reason}", headers={"Retry-After": "1"})
    models: ModelRegistry = request.app.state.models
    try:
        async with models.use(model_id) as served:
            yield served
    except UnknownModel as exc:
        raise ApiError(404, str(exc), param="model", code="model_not_found",
                       details=[{"field": "model", "message": "no such model"}]) from None
    except ModelUnavailable as exc:
        raise ApiError(503, f"model '{model_id or models.default}' is unavailable: {exc}", param="model",
                       code="model_unavailable") from None
    except ModelBusy as exc:
        raise ApiError(503, str(exc), headers={"Retry-After": "1"}, param="model", code="model_busy") from None


def version_headers(served: Served) -> dict[str, str]:
    """Which model and weights made a response, on every response that used one."""
    return {"X-Charlm-Model": served.id, "X-Charlm-Model-Version": served.version}


def logprob_lease(request: Request, values: int) -> Lease:
    """A request's share of the server's bound on held log-probabilities (app/budget.py), or the 429
    that says the server holds its limit."""
    try:
        lease: Lease = request.app.state.logprob_budget.take(values)
    except BudgetExhausted as exc:
        raise budget_refusal(exc, request.app.state.metrics) from None
    return lease


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def cancel_on_disconnect(request: Request, handles: Sequence[Handle[Any]]) -> asyncio.Future[None]:
    """Watch the connection and cancel `handles` the moment the client goes: queued requests leave
    the queue, running ones their rows, without waiting for the next write to fail. Cancel the
    returned watcher when the response is complete."""

    def gone(watcher: asyncio.Future[None]) -> None:
        if not watcher.cancelled():
            watcher.exception()  # a broken connection counts as gone, too
            for handle in handles:
                handle.cancel()

    watcher = asyncio.ensure_future(_until_disconnected(request))
    watcher.add_done_callback(gone)
    return watcher


async def compiled(outputs: StructuredOutputs | None, vocab: Vocab) -> CompiledConstraint | None:
    """A request's constraint compiled for the model's vocabulary, off the event loop (a new pattern
    takes a child process, up to charlm.constraint.COMPILE_SECONDS; a known one is cached)."""
    if outputs is None:
        return None
    return await run_in_threadpool(compile_constraint, outputs.constraint(), vocab.chars)
