"""Run-time model management: POST /admin/models/{id}/load, /unload and /reload.

The routes exist only while CHARLM_ADMIN_KEY is set, and need `Authorization: Bearer <admin key>`:
a key of its own (the settings refuse one equal to the API key), because the API key is handed to
every client and these routes can take a model out of service.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.errors import ApiError
from app.registry import ModelBusy, ModelRegistry, ModelUnavailable, UnknownModel
from app.schemas import ERROR_RESPONSES

_bearer = HTTPBearer(auto_error=False, scheme_name="AdminKey", description="CHARLM_ADMIN_KEY")


def require_admin_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    key = request.app.state.settings.admin_key
    given = credentials.credentials if credentials else ""
    if key is None or not secrets.compare_digest(given.encode(), key.get_secret_value().encode()):
        raise ApiError(401, "missing or wrong admin key: send Authorization: Bearer <CHARLM_ADMIN_KEY> "
                       "(the API key does not open these routes)", headers={"WWW-Authenticate": "Bearer"})


router = APIRouter(prefix="/admin/models", tags=["admin"], dependencies=[Depends(require_admin_key)],
                   responses={k: v for k, v in ERROR_RESPONSES.items() if k in (401, 404, 503)})


def _models(request: Request) -> ModelRegistry:
    models: ModelRegistry = request.app.state.models
    return models


def _refused(model_id: str, exc: Exception) -> ApiError:
    if isinstance(exc, UnknownModel):
        return ApiError(404, str(exc), details=[{"field": "model_id", "message": "no such model"}])
    if isinstance(exc, ModelBusy):
        return ApiError(503, str(exc), headers={"Retry-After": "1"})
    return ApiError(422, f"model '{model_id}' does not load: {exc}",
                    details=[{"field": "model_id", "message": "its file does not load"}])


@router.post("/{model_id}/load", summary="Load a model now (a model that failed to load is tried again)")
async def load(model_id: str, request: Request) -> dict[str, Any]:
    try:
        served = await _models(request).load(model_id)
    except (UnknownModel, ModelUnavailable, ModelBusy) as exc:
        raise _refused(model_id, exc) from None
    return {"id": served.id, "status": "loaded", "version": served.version}


@router.post("/{model_id}/unload", summary="Unload a model; its work in flight finishes first")
async def unload(model_id: str, request: Request) -> dict[str, Any]:
    try:
        was_loaded = await _models(request).unload(model_id)
    except UnknownModel as exc:
        raise _refused(model_id, exc) from None
    return {"id": model_id, "status": "available", "was_loaded": was_loaded}


@router.post("/{model_id}/reload", summary="Read the model's file again and serve it if it changed")
async def reload(model_id: str, request: Request) -> dict[str, Any]:
    """Work in flight finishes on the old weights; new work gets the new ones. A file that does not
    load is refused (422, with the checkpoint's error) and the old version keeps serving."""
    try:
        old, new = await _models(request).reload(model_id)
    except (UnknownModel, ModelUnavailable, ModelBusy) as exc:
        raise _refused(model_id, exc) from None
    return {"id": model_id, "status": "loaded", "previous_version": old, "version": new, "changed": old != new}
