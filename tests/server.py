"""Starting the service the way the container does, as a real process on a free port."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dockerfile_cmd() -> list[str]:
    """The image's exact exec-form CMD line."""
    match = re.search(r"^CMD (\[.*\])\s*$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert match, "Dockerfile has no exec-form CMD"
    cmd: list[str] = json.loads(match.group(1))
    executable = shutil.which(cmd[0], path=str(Path(sys.executable).parent)) or shutil.which(cmd[0])
    assert executable, f"{cmd[0]} is not installed"
    return [executable, *cmd[1:]]


class Server:
    """A running service. Its output goes to a file, not a pipe: nobody reads a pipe while the server
    runs, and once its buffer is full (about 64 KB of access log) the server blocks on logging."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path):
        self.process, self.url, self.log = process, f"http://127.0.0.1:{port}", log

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early: {self.output()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError("server never became ready")

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@contextmanager
def running_server(checkpoint: Path | None, **env: str) -> Iterator[Server]:
    """The service on a free port, with CHARLM_* settings from `env`; with `checkpoint` None it serves
    only what `env` names (CHARLM_MODELS)."""
    with server_process(checkpoint, env) as server:
        yield server


@contextmanager
def server_process(checkpoint: Path | None, env: dict[str, str], preexec: Callable[[], None] | None = None
                   ) -> Iterator[Server]:
    """running_server, with `preexec` run in the child before the server starts (to set its limits)."""
    port = free_port()
    environment = {**os.environ, "CHARLM_CHECKPOINT": str(checkpoint), "CHARLM_DEVICE": "cpu",
                   "CHARLM_HOST": "127.0.0.1", "CHARLM_PORT": str(port), "CHARLM_THREADS": "1", **env}
    if checkpoint is None and "CHARLM_CHECKPOINT" not in env:
        del environment["CHARLM_CHECKPOINT"]
    log = Path(tempfile.mkdtemp(prefix="charlm-server-")) / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(dockerfile_cmd(), env=environment, stdout=sink, stderr=subprocess.STDOUT,
                                   preexec_fn=preexec)
    server = Server(process, port, log)
    try:
        server.wait_ready()
        yield server
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
