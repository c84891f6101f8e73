"""Memory: the server's peak resident set under the worst requests it accepts, against the 768 MiB a
replica gets (deploy/kubernetes/base/deployment.yaml, docker-compose.yml), and how long GET /health
takes meanwhile.

Each scenario runs in a fresh server (the shipped model, two threads, the default settings), so each
peak (VmHWM) is that scenario's own:
- the review's request: echo + logprobs 5 on a 10,000-character prompt, n 64, max_tokens 2,000 (it
  took the server from 305 to 1,008 MiB before); now a 400 naming `logprobs`;
- the largest accepted whole responses, with and without an echoed 10,000-character prompt;
- streams of the largest accepted request whose clients never read, opened until the server refuses
  one (the server-wide bound), then closed, twice: the resident set after they go, and whether a
  second round adds to it;
- the largest whole response while patterns that blow up are compiled: the compile child's resident
  set counts against the replica's limit too (the same cgroup), so its peak is added to the server's.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from benchmarks.common import MODEL
from tests.server import Server, running_server

LIMIT_MIB = 768  # the replica's memory limit in the manifests and the compose file
PROMPT = ("The engineer and the sailor walked along the shore of the island. " * 160)[:10_000]


def mib(pid: int, field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for {pid}")


def send(server: Server, body: dict, read: bool = True) -> tuple[socket.socket, str]:
    """A raw /v1/completions request; with `read`, its whole reply (else the caller's socket, unread)."""
    host, port = server.url.removeprefix("http://").split(":")
    data = json.dumps({"model": "mysterious_island", **body}).encode()
    sock = socket.socket()
    if not read:  # a small window, set before connecting: the server's writes stop early
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    if not read:
        return sock, ""
    sock.settimeout(600)
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    sock.close()
    return sock, b"".join(chunks).decode(errors="replace")


class Watch:
    """Calls `poll` on its own thread every `interval` seconds until `stop`, which returns `value`."""

    def __init__(self, interval: float):
        self.interval, self.value, self._stop = interval, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            time.sleep(self.interval)

    def poll(self) -> None:
        raise NotImplementedError

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.value


class HealthWatch(Watch):
    """GET /health every 50 ms; `value` is the slowest answer seen, in seconds."""

    def __init__(self, server: Server):
        self.server, self.client = server, httpx.Client(timeout=60)
        super().__init__(0.05)

    def poll(self) -> None:
        start = time.monotonic()
        self.client.get(f"{self.server.url}/health")
        self.value = max(self.value, time.monotonic() - start)

    def stop(self) -> float:
        slowest = super().stop()
        self.client.close()
        return slowest


def scenario(name: str, run: Callable[[Server], str]) -> None:
    with running_server(MODEL, CHARLM_THREADS="2", CHARLM_MAX_LENGTH="2000") as server:
        pid = server.process.pid
        start = mib(pid, "VmRSS")
        watch = HealthWatch(server)
        outcome = run(server)
        slowest = watch.stop()
        peak = mib(pid, "VmHWM")
        print(f"{name}: {outcome}; RSS {start:.0f} -> peak {peak:.0f} MiB ({peak / LIMIT_MIB:.0%} of the "
              f"{LIMIT_MIB} MiB limit), after {mib(pid, 'VmRSS'):.0f} MiB; slowest /health {slowest * 1e3:.0f} ms",
              flush=True)


class ChildWatch(Watch):
    """Every 5 ms, the resident set of each child of `pid` (the constraint compiler); `value` is the
    largest seen, in MiB."""

    def __init__(self, pid: int):
        self.pid = pid
        super().__init__(0.005)

    def poll(self) -> None:
        for children in Path(f"/proc/{self.pid}/task").glob("*/children"):
            for child in children.read_text().split():
                try:
                    self.value = max(self.value, mib(int(child), "VmHWM"))
                except (OSError, RuntimeError):  # it ended meanwhile
                    pass


def compiling_beside_the_largest(server: Server) -> str:
    children = ChildWatch(server.process.pid)
    whole: list[str] = []
    worker = threading.Thread(target=lambda: whole.append(largest_whole(echo=False)(server)))
    worker.start()
    refusals = []
    for pattern in ("(a|b)*a(a|b){20}", "((a{1,50}){1,50}){1,50}", "(a|b)*a(a|b){14}"):
        _, reply = send(server, {"prompt": "The ", "max_tokens": 5, "structured_outputs": {"regex": pattern}})
        refusals.append(status(reply).split()[0])
    worker.join()
    child = children.stop()
    server_peak = mib(server.process.pid, "VmHWM")
    return (f"{whole[0]}; compiles {', '.join(refusals)}; compile child peak {child:.0f} MiB, with the server's "
            f"peak {server_peak + child:.0f} MiB ({(server_peak + child) / LIMIT_MIB:.0%} of {LIMIT_MIB})")


def status(reply: str) -> str:
    return reply.split("\r\n", 1)[0].removeprefix("HTTP/1.1 ")


def review_request(server: Server) -> str:
    _, reply = send(server, {"prompt": PROMPT, "echo": True, "logprobs": 5, "n": 64, "max_tokens": 2000})
    return f"{status(reply)}, {len(reply):,} bytes"


def largest_whole(echo: bool) -> Callable[[Server], str]:
    # 262,144 log-probabilities at most: (10,000 + 900) x 4 x 6 = 261,600, or 680 x 64 x 6 = 261,120.
    body = ({"prompt": PROMPT, "echo": True, "n": 4, "max_tokens": 900} if echo
            else {"prompt": "The island", "n": 64, "max_tokens": 680})

    def run(server: Server) -> str:
        _, reply = send(server, {**body, "logprobs": 5, "seed": 1})
        return f"{status(reply)}, {len(reply) / 2**20:.1f} MiB response"
    return run


def unread_streams(server: Server) -> str:
    """Two rounds: what the first leaves behind is reused by the second, not added to."""
    rounds = [_unread_round(server) for _ in range(2)]
    return "; ".join(f"round {i + 1}: {held} held, the next one 429, RSS with them {peak:.0f} MiB, "
                     f"after closing {after:.0f} MiB" for i, (held, peak, after) in enumerate(rounds))


def _unread_round(server: Server) -> tuple[int, float, float]:
    body = {"prompt": "The island", "n": 64, "max_tokens": 680, "logprobs": 5, "stream": True, "seed": 1}
    held = []
    while True:
        sock, _ = send(server, body, read=False)
        sock.settimeout(2)
        try:
            first = sock.recv(64)
        except TimeoutError:
            first = b""
        if first.startswith(b"HTTP/1.1 429"):
            sock.close()
            break
        held.append(sock)
        time.sleep(5)  # let its generation run to the end, nobody reading
    peak = mib(server.process.pid, "VmRSS")
    for sock in held:
        sock.close()
    time.sleep(2)
    return len(held), peak, mib(server.process.pid, "VmRSS")


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    scenario("the review's request (10 kB)", review_request)
    scenario("largest accepted whole response, n 64 x 680 chars x logprobs 5", largest_whole(echo=False))
    scenario("largest accepted whole response, 10,000-char prompt echoed, n 4", largest_whole(echo=True))
    scenario("streams of the largest accepted request, never read", unread_streams)
    scenario("largest accepted whole response while patterns that blow up compile", compiling_beside_the_largest)


if __name__ == "__main__":
    main()
