"""What clients can make a live server hold, over real sockets: bodies that never finish, idle
connections by the hundred under a low descriptor limit, streams nobody reads, keys in a query string.
Every wait here is for the server to act; the bounds on /health are generous, not races."""

from __future__ import annotations

import json
import resource
import socket
import time
from pathlib import Path

import httpx

from tests.server import Server, running_server, server_process
from tests.test_process import read_all, start_request


def address(server: Server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def slowest_health(server: Server, times: int) -> float:
    """The longest of `times` GET /health round trips, in seconds."""
    worst = 0.0
    for _ in range(times):
        start = time.monotonic()
        assert httpx.get(f"{server.url}/health", timeout=60).status_code == 200
        worst = max(worst, time.monotonic() - start)
    return worst


def test_a_body_that_stops_half_way_gets_408_and_its_connection_closes(tiny_checkpoint_path: Path) -> None:
    with running_server(tiny_checkpoint_path, CHARLM_BODY_TIMEOUT="1") as server:
        clients = []
        for path in ("/generate", "/v1/completions", "/score"):
            sock = socket.create_connection(address(server))
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         "Content-Length: 100\r\n\r\n{\"seed\": ".encode())  # and then nothing
            clients.append((path, sock))
        for path, sock in clients:
            reply = read_all(sock)  # read_all returns once the server closes the connection
            head, _, body = reply.partition("\r\n\r\n")
            assert head.startswith("HTTP/1.1 408"), (path, reply)
            assert "did not arrive" in json.loads(body)["error"]["message"]
            sock.close()
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200


def test_the_oldest_idle_connection_makes_room_for_a_new_one(tiny_checkpoint_path: Path) -> None:
    with running_server(tiny_checkpoint_path, CHARLM_LIMIT_CONCURRENCY="4") as server:
        idle = [socket.create_connection(address(server)) for _ in range(4)]
        assert httpx.get(f"{server.url}/health", timeout=60).status_code == 200  # served, not refused
        idle[0].settimeout(60)
        assert idle[0].recv(1024) == b""  # the first one, idle the longest, was closed for it
        for sock in idle:
            sock.close()


def test_idle_connections_never_exhaust_the_descriptors(tiny_checkpoint_path: Path) -> None:
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96))

    with server_process(tiny_checkpoint_path, {}, preexec=low_limit) as server:
        idle = [socket.create_connection(address(server)) for _ in range(110)]
        assert httpx.get(f"{server.url}/health", timeout=60).status_code == 200
        r = httpx.post(f"{server.url}/generate", json={"seed": "The ", "length": 20}, timeout=60)
        assert r.status_code == 200 and len(r.json()["generated"]) == 20
        for sock in idle:
            sock.close()
        assert "limited to" in server.output() and "RLIMIT_NOFILE" in server.output()


def test_an_api_key_in_the_query_string_never_reaches_the_log(tiny_checkpoint_path: Path) -> None:
    secret = "k3y-in-the-url-0123456789"
    with running_server(tiny_checkpoint_path, CHARLM_API_KEY="the-real-key") as server:
        for path in (f"/info?api_key={secret}", f"/v1/models?x=1&key={secret}", f"/info?{secret}"):
            assert httpx.get(f"{server.url}{path}", timeout=30).status_code == 401
        log = server.output()
    assert secret not in log and "api_key=<redacted>" in log and "/v1/models?x=<redacted>&key=<redacted>" in log
    assert "/info?<redacted>" in log  # a bare value is not taken for a name


def ask(server: Server, path: str, body: dict) -> str:
    """One request on a connection of its own, closed after the reply, which is returned whole."""
    host, port = address(server)
    data = json.dumps(body).encode()
    with socket.create_connection((host, port)) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        return read_all(sock)


def stream_nobody_reads(server: Server, n: int, max_tokens: int) -> socket.socket:
    """A /v1 stream with log-probabilities whose client never reads a byte."""
    sock = start_request(server, "/v1/completions", {"model": "tiny", "prompt": "The ", "n": n, "logprobs": 5,
                                                     "max_tokens": max_tokens, "stream": True, "seed": 1})
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


def test_streams_nobody_reads_hold_a_bounded_share_and_closing_them_stalls_nothing(
        tiny_checkpoint_path: Path) -> None:
    # Each stream may carry 64 x 1000 x 6 = 384,000 log-probabilities; the server holds at most two of them.
    env = {"CHARLM_MAX_BATCH": "64", "CHARLM_MAX_LOGPROB_VALUES": "400000",
           "CHARLM_MAX_LOGPROB_VALUES_HELD": "800000", "CHARLM_STREAM_INTERVAL_MS": "0",
           "CHARLM_SEND_TIMEOUT": "3600"}
    with running_server(tiny_checkpoint_path, **env) as server:
        readers = [stream_nobody_reads(server, 64, 1000) for _ in range(2)]
        while server.metric("charlm_decode_rows_total") < 2 * 64 * 999:  # all made, none read
            time.sleep(0.05)
        refused = read_all(stream_nobody_reads(server, 64, 1000))
        assert refused.startswith("HTTP/1.1 429") and "retry-after: 1" in refused.lower()
        assert "not yet read" in refused
        for sock in readers:
            sock.close()
        assert slowest_health(server, 20) < 2.0  # was 10.7-11.3 s while such streams' leftovers were encoded
        while True:  # their shares come back once the server has seen them go
            reply = ask(server, "/v1/completions", {"model": "tiny", "prompt": "The ", "n": 64, "logprobs": 5,
                                                    "max_tokens": 1000})
            if not reply.startswith("HTTP/1.1 429"):
                break
            time.sleep(0.05)
        assert reply.startswith("HTTP/1.1 200")


def test_health_answers_while_the_largest_accepted_response_is_written(tiny_checkpoint_path: Path) -> None:
    env = {"CHARLM_MAX_BATCH": "64", "CHARLM_MAX_LOGPROB_VALUES": "1000000",
           "CHARLM_MAX_LOGPROB_VALUES_HELD": "1000000"}
    with running_server(tiny_checkpoint_path, **env) as server:
        prompt = ("the engineer and the sailor walked along the shore " * 40)[:2000]
        big = start_request(server, "/v1/completions", {"model": "tiny", "prompt": prompt, "echo": True, "n": 63,
                                                        "logprobs": 5, "max_tokens": 600})
        while server.metric("charlm_decode_rows_total") < 63 * 599:
            time.sleep(0.05)
        assert slowest_health(server, 20) < 2.0
        reply = read_all(big)
        assert reply.startswith("HTTP/1.1 200")


def test_a_response_nobody_reads_is_cut_off_and_gives_its_share_back(tiny_checkpoint_path: Path) -> None:
    # Room for one such stream: while it is held, the same request is refused; once the server has
    # cut off the client that stopped reading, it is answered.
    env = {"CHARLM_MAX_BATCH": "64", "CHARLM_MAX_LOGPROB_VALUES": "400000", "CHARLM_MAX_LOGPROB_VALUES_HELD": "400000",
           "CHARLM_STREAM_INTERVAL_MS": "0", "CHARLM_SEND_TIMEOUT": "1"}
    body = {"model": "tiny", "prompt": "The ", "n": 64, "logprobs": 5, "max_tokens": 1000, "seed": 1}
    with running_server(tiny_checkpoint_path, **env) as server:
        stalled = stream_nobody_reads(server, 64, 1000)
        while True:
            reply = ask(server, "/v1/completions", body)
            if not reply.startswith("HTTP/1.1 429"):
                break
            time.sleep(0.05)
        assert reply.startswith("HTTP/1.1 200")
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 23)  # now read what got through, quickly
        stalled.settimeout(60)
        received = b""
        try:
            while chunk := stalled.recv(1 << 16):
                received += chunk
        except ConnectionResetError:
            pass
        assert b"[DONE]" not in received  # cut off, not finished
