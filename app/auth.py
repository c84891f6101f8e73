"""The API key: when CHARLM_API_KEY is set, routes that depend on `Authorized` need
`Authorization: Bearer <key>`, compared in constant time."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.errors import ApiError

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


Authorized = Depends(require_api_key)
