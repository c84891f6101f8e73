"""Load test: charlm's server vs a naive server (the notebook's sample() per request), same run.

Each server runs as its own uvicorn process on loopback. For 1, 8 and 64 concurrent clients,
every client sends 500-character requests back to back for at least --seconds; we report
aggregate characters/s, p50/p99 latency and errors, and the ratios at 64 clients.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from benchmarks.common import MODEL, ROOT
from tests.server import free_port

BODY = {"seed": "The island", "length": 500, "scale_factor": 2.0}


@dataclass
class LoadResult:
    clients: int
    chars_per_s: float
    p50: float
    p99: float
    errors: int
    requests: int


@contextmanager
def server(command: list[str], port: int, env: dict[str, str]) -> Iterator[str]:
    process = subprocess.Popen(command, env={**os.environ, **env}, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"server {command} did not become ready")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


async def load(url: str, clients: int, seconds: float) -> LoadResult:
    latencies: list[float] = []
    errors = 0
    chars = 0
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(limits=limits, timeout=600) as http:
        start = time.perf_counter()

        async def client(i: int) -> None:
            nonlocal errors, chars
            n = 0
            while time.perf_counter() - start < seconds:
                sent = time.perf_counter()
                try:
                    r = await http.post(f"{url}/generate", json={**BODY, "random_seed": i * 1000 + n})
                    if r.status_code == 200:
                        chars += len(r.json()["generated"])
                        latencies.append(time.perf_counter() - sent)
                    else:
                        errors += 1
                except httpx.HTTPError:
                    errors += 1
                n += 1

        await asyncio.gather(*(client(i) for i in range(clients)))
        wall = time.perf_counter() - start
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return LoadResult(clients, chars / wall, statistics.median(latencies), quantiles[98], errors, len(latencies))


def run_levels(name: str, url: str, levels: list[int], seconds: float) -> dict[int, LoadResult]:
    results = {}
    for clients in levels:
        r = asyncio.run(load(url, clients, seconds))
        results[clients] = r
        print(f"{name:7s} {clients:3d} clients: {r.chars_per_s:9,.0f} chars/s  p50 {r.p50:7.2f} s  "
              f"p99 {r.p99:7.2f} s  errors {r.errors}  ({r.requests} requests)", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default=str(MODEL))
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--levels", default="1,8,64")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    env = {"CHARLM_CHECKPOINT": args.checkpoint, "CHARLM_DEVICE": "cpu"}
    port = free_port()
    with server([sys.executable, "-m", "charlm.cli", "serve", "--port", str(port)], port, env) as url:
        ours = run_levels("charlm", url, levels, args.seconds)
    port = free_port()
    naive_cmd = [sys.executable, "-m", "uvicorn", "benchmarks.naive_server:app", "--port", str(port),
                 "--log-level", "warning"]
    with server(naive_cmd, port, env) as url:
        naive = run_levels("naive", url, levels, args.seconds)
    top = max(levels)
    o, n = ours[top], naive[top]
    print(f"at {top} clients: charlm/naive chars/s = {o.chars_per_s / n.chars_per_s:.1f}x (target >= 30x), "
          f"errors {o.errors}; p99 charlm/naive = {o.p99 / n.p99:.3f} (target <= 0.1)")


if __name__ == "__main__":
    main()
