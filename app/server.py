"""Running the service under uvicorn: connection limits, and a SIGTERM that drains, finishes what is
in flight within the grace period, answers the rest with a proper error, and exits 0."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import resource
import signal
import threading
import time
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.main import create_app
from app.settings import Settings

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
        models = self.fastapi_app.state.models
        for engine in models.engines() if models is not None else []:
            threading.Thread(target=engine.close, args=(grace,), daemon=True).start()
        self.should_exit = True


def guarded_protocol(header_seconds: float, send_seconds: float, max_connections: int) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol plus what it lacks:

    - a connection that has not sent a complete request head within `header_seconds` of opening (or
      of its last response) is closed, so clients that connect and send nothing, or a header a byte at
      a time, cannot hold sockets forever (the body has its own deadline: main.BodyLimit);
    - a response that cannot be written for `send_seconds` (its client reads nothing) is cut off:
      whatever the response holds (a stream's work, its share of app/budget.py) goes with it;
    - at `max_connections` open, a new connection closes the ones idle the longest (no request in
      progress, not even part of a head), so the process never runs out of descriptors while idle
      clients hold them and probes and real clients are still served. When none is idle, uvicorn
      answers the new one's request with 503, and past BUSY_OVERFLOW more the connection is closed.

    A connection the server ends while data is still waiting for its client is aborted, not closed:
    a close would wait for a client that does not read, and keep the socket and its buffer."""

    class GuardedProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _send_timer: asyncio.TimerHandle | None = None
        _idle_since: float = 0.0

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()
            if len(self.connections) >= max_connections:
                self._make_room()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            for timer in (self._head_timer, self._send_timer):
                if timer is not None:
                    timer.cancel()
            super().connection_lost(exc)

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._send_timer is None:
                self._send_timer = self.loop.call_later(send_seconds, self._end)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None

        def _between_requests(self) -> bool:
            """No complete request head since the last response (or since the connection opened)."""
            return self.cycle is None or self.cycle.response_complete

        def _idle(self) -> bool:
            """Between requests, and no part of the next one's head received: free to make room."""
            return self._between_requests() and not self.conn.trailing_data[0]

        def _make_room(self) -> None:
            """Close the longest-idle connections until this one is within the limit (uvicorn answers
            503 at the limit itself), or close this one when too many are busy to make room."""
            open_ = [c for c in self.connections if isinstance(c, GuardedProtocol) and not c.transport.is_closing()]
            idle = sorted((c for c in open_ if c is not self and c._idle()), key=lambda c: c._idle_since)
            for connection in idle[: max(0, len(open_) - (max_connections - 1))]:
                connection._end()
            if len(open_) - len(idle) > max_connections + BUSY_OVERFLOW:
                self._end()  # beyond what its 503 may take: the descriptors are kept

        def _arm(self) -> None:
            self._idle_since = time.monotonic()
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(header_seconds, self._expired)

        def _expired(self) -> None:
            # No request head since armed; a response still waiting to be read is the send timer's.
            if self._between_requests() and not self.flow.write_paused:
                self._end()

        def _end(self) -> None:
            if self.transport.get_write_buffer_size():  # also a close already waiting on that data
                self.transport.abort()
            elif not self.transport.is_closing():
                self.transport.close()

    return GuardedProtocol


# Descriptors kept free for what is not a connection: the listening socket, logs, files read at run time,
# and BUSY_OVERFLOW connections beyond the limit that are told 503 when every other one is busy.
DESCRIPTOR_RESERVE = 16
BUSY_OVERFLOW = 8


def connection_limit(configured: int) -> int:
    """The configured connection limit, lowered to what the descriptor limit (RLIMIT_NOFILE) leaves
    after those already open and a reserve, so that accept() never fails for want of a descriptor."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:  # no /proc: assume the standard three and a few more
        in_use = 8
    return max(1, min(configured, soft - in_use - DESCRIPTOR_RESERVE))


class RedactQuery(logging.Filter):
    """Access-log lines show a query string's parameter names, never their values: a client may put
    an API key there (it is refused, but it must not reach the log). Anything that does not look like
    a plain name (a bare value, a long or odd name) is not shown either."""

    NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}")

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            path, query = args[2].split("?", 1)
            record.args = (*args[:2], path + "?" + "&".join(map(self._redact, query.split("&"))), *args[3:])
        return True

    def _redact(self, part: str) -> str:
        name, equals, _ = part.partition("=")
        return f"{name}=<redacted>" if equals and self.NAME.fullmatch(name) else "<redacted>"


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    limit = connection_limit(settings.limit_concurrency)
    if limit < settings.limit_concurrency:
        log.info("connections limited to %d by the descriptor limit (RLIMIT_NOFILE)", limit)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level="info",
        http=guarded_protocol(settings.header_timeout, settings.send_timeout, limit),
        limit_concurrency=limit, backlog=settings.backlog,
        timeout_keep_alive=settings.timeout_keep_alive,
        # uvicorn's None means "wait forever": always give it a number, past the engine's own grace.
        timeout_graceful_shutdown=settings.grace_seconds + RESPONSE_MARGIN_SECONDS,  # type: ignore[arg-type]
    )
    logging.getLogger("uvicorn.access").addFilter(RedactQuery())  # after Config has set up uvicorn's logging
    return config


def serve(settings: Settings) -> None:
    app = create_app(settings)
    DrainingServer(uvicorn_config(app, settings), app, settings).run()
