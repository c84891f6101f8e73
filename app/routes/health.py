"""Probes and the model card: /health (liveness), /ready (readiness), /info."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from app.auth import Authorized
from app.deps import not_ready_reason
from app.errors import error_response
from app.registry import ModelInfo
from app.schemas import ERROR_RESPONSES
from charlm import __version__, native
from charlm.device import resolve_device
from charlm.request import MAX_LOGPROBS, EngineLimits
from charlm.sampling import MAX_SCALE_FACTOR, MAX_TOP_K

router = APIRouter(tags=["service"])


@router.get("/health", summary="Liveness: 200 while the process runs")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", summary="Readiness: 503 until the default model is loaded and warmed up, and while "
            "shutting down",
            responses={503: ERROR_RESPONSES[503]})
async def ready(request: Request) -> Any:
    reason = not_ready_reason(request.app.state)
    if reason:
        return error_response(503, f"not ready: {reason}", headers={"Retry-After": "1"})
    return {"status": "ready"}


def public_summary(value: Any) -> Any:
    """The training summary as a client may see it: every corpus's name, size and checksum, and its
    source only where that is a public address. A path says where the trainer's files lay on its
    machine, which is nobody's business and changes from machine to machine."""
    if isinstance(value, dict):
        return {k: public_summary(v) for k, v in value.items() if k != "source" or _public(v)}
    if isinstance(value, list):
        return [public_summary(v) for v in value]
    return value


def _public(source: Any) -> bool:
    return isinstance(source, str) and source.startswith(("https://", "http://"))


@router.get("/info", dependencies=[Authorized], summary="The models' cards, limits, device and version",
            responses={k: v for k, v in ERROR_RESPONSES.items() if k in (401, 503)})
async def info(request: Request) -> dict[str, Any]:
    """Every model (loaded or not) with its card; `model` and `training` repeat the default model's."""
    state = request.app.state
    if state.models is None or not state.ready:  # while draining the cards are still true
        return error_response(503, "not ready: the models are still loading")  # type: ignore[return-value]
    settings, models = state.settings, state.models
    cards = [_card(i, settings.weights) for i in await models.listing()]
    default = next((c for c in cards if c["default"]), None)
    limits = EngineLimits()
    return {
        "default_model": models.default,
        "models": cards,
        "model": default,
        "training": default["training"] if default else None,
        "limits": {
            "max_length": settings.max_length,
            "max_seed_chars": settings.max_seed_chars,
            "max_batch": settings.max_batch,
            "max_queue": settings.max_queue,
            "max_stop": limits.max_stop,
            "max_stop_chars": limits.max_stop_chars,
            "max_score_chars": settings.max_score_chars,
            "max_logprobs": MAX_LOGPROBS,
            "max_choices": settings.max_choices,
            "max_scale_factor": MAX_SCALE_FACTOR,
            "max_top_k": MAX_TOP_K,
            "request_timeout_s": settings.request_timeout,
            "max_body_bytes": settings.max_body_bytes,
            "body_timeout_s": settings.body_timeout,
            "max_logprob_values": settings.max_logprob_values,
            "max_loaded": settings.max_loaded,
        },
        "auth_required": settings.api_key is not None,
        "device": str(resolve_device(settings.device)),
        "native_kernels": (kernels := native.load()) is not None,
        "kernels": kernels.isa if kernels is not None else None,  # the code path they run (CHARLM_KERNELS)
        "version": __version__,
    }


def _card(info: ModelInfo, weights: str | None) -> dict[str, Any]:
    header = info.header
    return {
        "id": info.id,
        "checkpoint": info.file,
        "status": info.status,
        "default": info.default,
        "version": info.version,
        "error": info.error,
        "config": header.config.to_dict() if header else None,
        "parameters": header.parameters if header else None,
        "vocabulary": "".join(header.vocab.chars) if header else None,
        "vocab_size": len(header.vocab) if header else None,
        "bits_per_char": info.bpc,
        "weights": weights or (header.weights if header else None),  # the decode weight format it runs in
        "training": public_summary(header.train) if header else None,
    }
