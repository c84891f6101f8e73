"""GET /metrics in the Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.auth import Authorized
from app.schemas import ERROR_RESPONSES

router = APIRouter(tags=["service"])


@router.get("/metrics", dependencies=[Authorized], summary="Prometheus metrics", response_class=Response,
            responses={401: ERROR_RESPONSES[401]})
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
