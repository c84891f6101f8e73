"""Dependencies shared by routes: the engine and readiness, the served model's id, cancelling on disconnect."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request

from app.budget import BudgetExhausted, Lease
from app.errors import ApiError, budget_refusal
from charlm.engine import Engine
from charlm.handles import Handle


def not_ready_reason(state: Any) -> str | None:
    """Why the service cannot take work now, or None: the one readiness rule for /ready, /info and routes."""
    if state.draining:
        return "shutting down"
    if not state.ready:
        return "the model is still loading"
    return None


def ready_engine(request: Request) -> Engine:
    """The engine, or 503 while loading, warming up or draining for shutdown."""
    reason = not_ready_reason(request.app.state)
    if reason:
        raise ApiError(503, f"not ready: {reason}", headers={"Retry-After": "1"})
    engine: Engine = request.app.state.engine
    return engine


EngineDep = Annotated[Engine, Depends(ready_engine)]


def logprob_lease(request: Request, values: int) -> Lease:
    """A request's share of the server's bound on held log-probabilities (app/budget.py), or the 429
    that says the server holds its limit."""
    try:
        lease: Lease = request.app.state.logprob_budget.take(values)
    except BudgetExhausted as exc:
        raise budget_refusal(exc, request.app.state.metrics) from None
    return lease


def served_model_id(request: Request) -> str:
    """The id clients name the served model by (OpenAI's `model`): the checkpoint file's stem."""
    return Path(request.app.state.settings.checkpoint).stem


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
