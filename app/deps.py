"""Dependencies shared by routes: the engine, readiness and the API key."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.errors import ApiError
from charlm.engine import Engine, Handle

_bearer = HTTPBearer(auto_error=False, description="needed only when the server sets CHARLM_API_KEY")


def require_api_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    key = request.app.state.settings.api_key
    if key is None:
        return
    given = credentials.credentials if credentials else ""
    if not secrets.compare_digest(given.encode(), key.get_secret_value().encode()):
        raise ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                       headers={"WWW-Authenticate": "Bearer"})


async def check_api_key_first(request: Request) -> None:
    """For errors raised before dependencies run (a malformed body): a route that needs the key
    answers 401 to a caller without it, before saying anything about the body."""
    route = request.scope.get("route")
    if isinstance(route, APIRoute) and any(d.call is require_api_key for d in route.dependant.dependencies):
        require_api_key(request, await _bearer(request))


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
Authorized = Depends(require_api_key)


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
