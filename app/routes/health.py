"""Probes and the model card: /health (liveness), /ready (readiness), /info."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from app.deps import Authorized
from app.errors import error_response
from app.schemas import ERROR_RESPONSES
from charlm import __version__

router = APIRouter(tags=["service"])


@router.get("/health", summary="Liveness: 200 while the process runs")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", summary="Readiness: 503 until the model is loaded and warmed up, and while shutting down",
            responses={503: ERROR_RESPONSES[503]})
async def ready(request: Request) -> Any:
    state = request.app.state
    if state.draining:
        return error_response(503, "not ready: shutting down", headers={"Retry-After": "1"})
    if not state.ready:
        return error_response(503, "not ready: the model is still loading", headers={"Retry-After": "1"})
    return {"status": "ready"}


@router.get("/info", dependencies=[Authorized], summary="The model card, limits, device and version",
            responses={k: v for k, v in ERROR_RESPONSES.items() if k in (401, 503)})
async def info(request: Request) -> dict[str, Any]:
    state = request.app.state
    if not state.ready:
        return error_response(503, "not ready: the model is still loading")  # type: ignore[return-value]
    ckpt, settings = state.checkpoint, state.settings
    return {
        "model": {
            "checkpoint": settings.checkpoint.name,
            "config": ckpt.config.to_dict(),
            "parameters": ckpt.model.num_parameters(),
            "vocabulary": "".join(ckpt.vocab.chars),
            "vocab_size": len(ckpt.vocab),
        },
        "training": ckpt.train,
        "limits": {
            "max_length": settings.max_length,
            "max_seed_chars": settings.max_seed_chars,
            "max_batch": settings.max_batch,
            "max_queue": settings.max_queue,
            "request_timeout_s": settings.request_timeout,
            "max_body_bytes": settings.max_body_bytes,
        },
        "device": str(state.engine.device),
        "native_kernels": state.engine.native,
        "version": __version__,
    }
