"""create_app(settings): the FastAPI application. The lifespan loads the checkpoint and starts the engine."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import errors
from app.metrics import Metrics
from app.routes import docs, generate, health, metrics, openai, playground, score
from app.settings import Settings
from charlm import __version__
from charlm.checkpoint import Checkpoint, load_checkpoint
from charlm.device import resolve_device
from charlm.engine import Engine, GenerationRequest

log = logging.getLogger("charlm")
STATIC = Path(__file__).parent / "static"


def _warm_up(engine: Engine) -> None:
    """One real generation, so /ready means the whole path works, not just that weights loaded."""
    seed = "The" if not engine.vocab.unknown("The") else engine.vocab.chars[0]
    engine.generate(GenerationRequest(seed=seed, length=16, random_seed=0), timeout=60)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    if settings.threads:
        torch.set_num_threads(settings.threads)
    ckpt: Checkpoint = app.state.checkpoint or await run_in_threadpool(
        load_checkpoint, settings.checkpoint, resolve_device(settings.device)
    )
    engine = Engine(ckpt.model, ckpt.vocab, settings.limits())
    app.state.checkpoint, app.state.engine = ckpt, engine
    await run_in_threadpool(_warm_up, engine)
    # What is alive now (torch, FastAPI, the model) lives as long as the process. Frozen, the
    # collector stops walking it: a full collection paused the engine's worker for ~120 ms here.
    gc.freeze()
    app.state.ready = True
    log.info("ready: %s on %s (%d parameters)", settings.checkpoint.name, engine.device, ckpt.model.num_parameters())
    if engine.device.type == "cpu" and not engine.native:
        log.warning("charlm._native is not built (no C compiler at install?): decoding on PyTorch alone, slower")
    try:
        yield
    finally:
        app.state.ready = False
        await run_in_threadpool(engine.close, settings.grace_seconds)


class BodyLimit:
    """413 in the common error shape for bodies over the limit, announced or streamed in chunks.

    The body (small by definition) is read up front and replayed to the app, after which the
    original `receive` is handed through so handlers still see the client disconnect.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, send)
        buffered: list[Message] = []
        size, more = 0, True
        while more:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await self._refuse(scope, send)

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        message = f"request body over the limit of {self.max_bytes} bytes"
        response = errors.error_response_for(scope["path"], 413, message)  # OpenAI's shape on /v1
        await response(scope, _disconnected, send)


async def _disconnected() -> Message:
    return {"type": "http.disconnect"}


class RequestMetrics:
    """Counts and times every request by route template and status (pure ASGI: streaming-safe)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


def create_app(settings: Settings | None = None, checkpoint: Checkpoint | None = None) -> FastAPI:
    """The service. `checkpoint` may be preloaded (the CLI checks it before starting the server)."""
    settings = settings or Settings()
    app = FastAPI(
        title="charlm",
        version=__version__,
        description="Character-level LSTM text generation. Try `POST /generate` below: press "
        "*Try it out*, then *Execute*.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings, app.state.checkpoint = settings, checkpoint
    app.state.engine, app.state.ready, app.state.draining = None, False, False
    app.state.metrics = Metrics(lambda: app.state.engine)
    errors.install(app)
    for module in (generate, score, openai, health, metrics, docs, playground):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=app.state.metrics)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, without the Bearer requirement when the server has no API key (the page
    would otherwise ask for a token that nothing checks), and without FastAPI's 422 on /v1, which
    answers invalid requests with OpenAI's 400."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        for path, operations in schema["paths"].items():
            if errors.is_openai_path(path):
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
        if app.state.settings.api_key is None:
            schema.get("components", {}).pop("securitySchemes", None)
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation.pop("security", None)
    return app.openapi_schema  # type: ignore[return-value]


def app_factory() -> Any:
    """For `uvicorn --factory app.main:app_factory`: settings from the environment."""
    return create_app()
