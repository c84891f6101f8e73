"""Running the service under uvicorn with a graceful SIGTERM: drain, finish in-flight work, exit 0."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import uvicorn
from fastapi import FastAPI

from app.main import create_app
from app.settings import Settings
from charlm.checkpoint import Checkpoint

log = logging.getLogger("charlm")


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: /ready turns 503 and new work is refused at once; after `drain_seconds`
    (for load balancers to notice) uvicorn stops and waits up to `grace_seconds` for in-flight
    requests. The process then exits 0. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_seconds: float):
        super().__init__(config)
        self.fastapi_app, self.drain_seconds = app, drain_seconds

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = self.fastapi_app.state
        if state.draining:
            self.should_exit = self.force_exit = True
            return
        state.draining = True
        log.info("received %s: draining", signal.Signals(sig).name)
        threading.Timer(self.drain_seconds, lambda: setattr(self, "should_exit", True)).start()


def serve(settings: Settings, checkpoint: Checkpoint | None = None) -> None:
    app = create_app(settings, checkpoint)
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            timeout_graceful_shutdown=int(settings.grace_seconds) or None, log_level="info")
    DrainingServer(config, app, settings.drain_seconds).run()
