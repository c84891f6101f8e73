"""create_app(settings): the FastAPI application. The lifespan finds the models, loads those to preload and
sets up reloading; app.state.models (app/registry.py) serves them."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import errors, handlers
from app.budget import LogprobBudget
from app.metrics import Metrics
from app.registry import ModelRegistry, ModelUnavailable
from app.routes import admin, docs, generate, health, metrics, openai, playground, score, tokenize
from app.settings import Settings
from charlm import __version__, native
from charlm.engine import EngineHooks

log = logging.getLogger("charlm")
STATIC = Path(__file__).parent / "static"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if (kernels := native.load()) is not None:
        kernels.use(settings.kernels)  # checked by the settings: this CPU runs it
    models = ModelRegistry(settings.registry_config(), hooks=app.state.engine_hooks, metrics=app.state.metrics)
    app.state.models = models
    try:
        await _preload(models, settings.preload)
    except BaseException:
        await models.close(0)
        raise
    # What is alive now (torch, FastAPI, the models) lives as long as the process. Frozen, the
    # collector stops walking it: a full collection paused the engine's worker for ~120 ms here.
    gc.freeze()
    app.state.ready = True
    background = [asyncio.ensure_future(_keep_alive(models))] if settings.keep_alive else []
    hangup = _on_sighup(lambda: background.append(asyncio.ensure_future(models.reload_changed())))
    try:
        yield
    finally:
        app.state.ready = False
        hangup()
        for task in background:
            task.cancel()
        await models.close(settings.grace_seconds)


async def _preload(models: ModelRegistry, which: str) -> None:
    """CHARLM_PRELOAD: the default model (a failure stops the start: the server would serve nothing
    by default), or every model (others that fail are listed as unavailable), or none."""
    if models.default is None:
        models.check_default()  # says why there is none
    models.resolve(None)  # an unknown CHARLM_DEFAULT_MODEL is an error at start
    if which == "none":
        return
    served = await models.load(models.resolve(None))
    log.info("ready: default model %s version %s on %s (%d parameters)", served.id, served.version,
             served.engine.device, served.checkpoint.model.num_parameters())
    if served.engine.device.type == "cpu" and not served.engine.native:
        log.warning("charlm._native is not built (no C compiler at install?): decoding on PyTorch alone, slower")
    if which == "all":
        for model_id in [m for m in models.ids() if m != models.default][: models.config.max_loaded - 1]:
            try:
                await models.load(model_id)
            except ModelUnavailable:
                pass  # logged; listed as unavailable with why


async def _keep_alive(models: ModelRegistry) -> None:
    assert models.config.keep_alive is not None
    while True:
        await asyncio.sleep(min(models.config.keep_alive / 4, 5.0))
        await models.unload_idle()


def _on_sighup(reload: Callable[[], object]) -> Callable[[], None]:
    """SIGHUP reloads every model whose file changed (where the loop can take signals: the main
    thread, as under uvicorn). Returns what removes the handler."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, reload)
    except (ValueError, RuntimeError, NotImplementedError):  # not the main thread (a test client)
        return lambda: None
    log.info("SIGHUP reloads every loaded model whose file changed")
    return lambda: None if loop.remove_signal_handler(signal.SIGHUP) else None


class BodyLimit:
    """413 in the common error shape for bodies over the limit, announced or streamed in chunks, and
    408 for a body that does not arrive whole within `timeout` seconds of the request's head (a client
    that sends its body a byte at a time, or stops half-way, would otherwise hold its connection and
    task for ever).

    The body (small by definition) is read up front and replayed to the app, after which the
    original `receive` is handed through so handlers still see the client disconnect.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        too_large = f"request body over the limit of {self.max_bytes} bytes"
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, send, 413, too_large)
        try:
            async with asyncio.timeout(self.timeout):
                buffered = await self._read(receive)
        except TimeoutError:
            return await self._refuse(scope, send, 408, f"the request body did not arrive within {self.timeout:g} s "
                                      "of its head; send it whole, without pauses")
        if buffered is None:
            return await self._refuse(scope, send, 413, too_large)

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> list[Message] | None:
        """The body's messages, up to the disconnect if it comes first; None past the size limit."""
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
                return None
        return buffered

    async def _refuse(self, scope: Scope, send: Send, status: int, message: str) -> None:
        # OpenAI's shape on /v1; the connection closes, since the rest of the body is not read.
        response = errors.error_response_for(scope["path"], status, message, headers={"Connection": "close"})
        await response(scope, _disconnected, send)


class SecurityHeaders:
    """Defence in depth for every response: no MIME sniffing, no framing by other sites (clickjacking),
    and for pages a Content-Security-Policy that lets them load only this server's own scripts, styles
    and data (the playground and /docs are built to need nothing else)."""

    HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
               (b"referrer-policy", b"no-referrer")]
    CSP = (b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
           b"object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
    # FastAPI's Swagger UI page starts the bundle with an inline script and styles elements inline.
    DOCS_CSP = CSP.replace(b"script-src 'self'", b"script-src 'self' 'unsafe-inline'").replace(
        b"style-src 'self'", b"style-src 'self' 'unsafe-inline'")

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        csp = self.DOCS_CSP if scope["path"] == "/docs" else self.CSP

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", [])) + self.HEADERS
                headers.append((b"content-security-policy", csp))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


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


def create_app(settings: Settings | None = None, engine_hooks: EngineHooks | None = None) -> FastAPI:
    """The service. `engine_hooks` reach inside every model's engine (tests inject faults with them)."""
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
    app.state.settings, app.state.engine_hooks = settings, engine_hooks
    app.state.models, app.state.ready, app.state.draining = None, False, False
    app.state.metrics = Metrics(lambda: app.state.models.loaded() if app.state.models else [],
                                lambda: app.state.models.cache if app.state.models else None)
    app.state.logprob_budget = LogprobBudget(settings.max_logprob_values_held)
    handlers.install(app)
    for module in (generate, score, tokenize, openai, health, metrics, docs, playground):
        app.include_router(module.router)
    if settings.admin_key is not None:  # the routes do not exist without their key
        app.include_router(admin.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout)
    app.add_middleware(SecurityHeaders)
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
            schema.get("components", {}).get("securitySchemes", {}).pop("HTTPBearer", None)
            for operations in schema["paths"].values():
                for operation in operations.values():
                    kept = [s for s in operation.pop("security", []) if "HTTPBearer" not in s]
                    if kept:
                        operation["security"] = kept
            if not schema.get("components", {}).get("securitySchemes", True):
                schema["components"].pop("securitySchemes")
    return app.openapi_schema  # type: ignore[return-value]


def app_factory() -> Any:
    """For `uvicorn --factory app.main:app_factory`: settings from the environment."""
    return create_app()
