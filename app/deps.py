"""Dependencies shared by routes: the engine, readiness and the API key."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.errors import ApiError
from charlm.engine import Engine

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


def ready_engine(request: Request) -> Engine:
    """The engine, or 503 while loading, warming up or draining for shutdown."""
    state = request.app.state
    if not state.ready or state.draining:
        reason = "shutting down" if state.draining else "the model is still loading"
        raise ApiError(503, f"not ready: {reason}", headers={"Retry-After": "1"})
    engine: Engine = state.engine
    return engine


EngineDep = Annotated[Engine, Depends(ready_engine)]
Authorized = Depends(require_api_key)
