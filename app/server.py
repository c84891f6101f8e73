"""Running the service under uvicorn: connection limits, and a SIGTERM that drains, finishes what is
in flight within the grace period, answers the rest with a proper error, and exits 0."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.main import create_app
from app.settings import Settings
from charlm.checkpoint import Checkpoint

log = logging.getLogger("charlm")

# Past the grace period the engine ends what is left with an error; handlers get this long to send
# it before uvicorn cancels them.
RESPONSE_MARGIN_SECONDS = 5.0


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: /ready turns 503 and new work is refused at once; after `drain_seconds`
    (for load balancers to notice) uvicorn stops accepting, and the engine gives in-flight requests
    up to `grace_seconds` before ending the rest with an error their handlers send as JSON (or an
    SSE `error` event). A second signal skips the drain and the grace; a third stops waiting even
    for clients that do not read their error."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, settings: Settings):
        super().__init__(config)
        self.fastapi_app, self.settings = app, settings
        self._drain: threading.Timer | None = None
        self._signals = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        name = signal.Signals(sig).name
        self._signals += 1
        if self._signals == 1:
            self.fastapi_app.state.draining = True
            log.info("received %s: draining for %.1f s, then up to %.1f s for in-flight requests",
                     name, self.settings.drain_seconds, self.settings.grace_seconds)
            self._drain = threading.Timer(self.settings.drain_seconds, self._stop, (self.settings.grace_seconds,))
            self._drain.daemon = True
            self._drain.start()
        elif self._signals == 2:  # in-flight requests end now, each with its error response
            log.info("received %s again: exiting now, in-flight requests end with an error", name)
            if self._drain is not None:
                self._drain.cancel()
            self.config.timeout_graceful_shutdown = RESPONSE_MARGIN_SECONDS  # type: ignore[assignment]
            self._stop(0.0)
        else:  # a client that does not read its error must not hold the exit either
            self.should_exit = self.force_exit = True

    def _stop(self, grace: float) -> None:
        engine = self.fastapi_app.state.engine
        if engine is not None:
            threading.Thread(target=engine.close, args=(grace,), daemon=True).start()
        self.should_exit = True


def header_timeout_protocol(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol plus what it lacks: a connection that has not sent a complete request
    head within `seconds` of opening (or of its last response) is closed, so clients that connect
    and send nothing, or a header a byte at a time, cannot hold sockets forever."""

    class HeaderTimeoutProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(seconds, self._expired)

        def _expired(self) -> None:
            idle = self.cycle is None or self.cycle.response_complete  # no request head since armed
            if idle and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level="info",
        http=header_timeout_protocol(settings.header_timeout),
        limit_concurrency=settings.limit_concurrency, backlog=settings.backlog,
        timeout_keep_alive=settings.timeout_keep_alive,
        # uvicorn's None means "wait forever": always give it a number, past the engine's own grace.
        timeout_graceful_shutdown=settings.grace_seconds + RESPONSE_MARGIN_SECONDS,  # type: ignore[arg-type]
    )


def serve(settings: Settings, checkpoint: Checkpoint | None = None) -> None:
    app = create_app(settings, checkpoint)
    DrainingServer(uvicorn_config(app, settings), app, settings).run()
