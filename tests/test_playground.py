"""The playground page (GET /) in headless Chromium against a real uvicorn process, with every host
but loopback unresolvable, so the page is proven to work offline.

Waits are bounded loops on what the page or the server shows, never fixed sleeps. Set
CHARLM_UPDATE_SCREENSHOT=1 to serve the shipped model instead of the tiny one and redraw
docs/playground.png for the README.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import pytest

from tests.server import ROOT, Server, running_server

if TYPE_CHECKING:
    from selenium.webdriver.chrome.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="chromium and chromium-driver are not installed (.ci/run installs Debian's chromium and chromium-driver)",
)

UPDATE_SCREENSHOT = os.environ.get("CHARLM_UPDATE_SCREENSHOT") == "1"
SHIPPED_MODEL = ROOT / "models" / "mysterious_island.safetensors"
MAX_LENGTH = 10_000_000  # long enough that a generation meant to be stopped never ends by itself
SERVER_ENV = {"CHARLM_MAX_LENGTH": str(MAX_LENGTH), "CHARLM_STREAM_INTERVAL_MS": "50"}
WAIT_S = 60.0  # the bound on every wait: a safety net for a stuck test, not a speed requirement
API_KEY = "s3cret-playground-key"

T = TypeVar("T")


def wait_for(condition: Callable[[], T | None], what: str, timeout: float = WAIT_S) -> T:
    """Poll until `condition` returns something truthy, and return it; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    checkpoint = SHIPPED_MODEL if UPDATE_SCREENSHOT else request.getfixturevalue("tiny_checkpoint_path")
    with running_server(checkpoint, **SERVER_ENV) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-dev-shm-usage",
                 # cut the network: every host but loopback fails to resolve
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        options.add_argument(flag)
    # The network log (every response and failure) and the console, for the no-failed-request check.
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_window_size(1100, 900)
    try:
        yield driver
    finally:
        driver.quit()


# ---------------------------------------------------------------- page helpers


def by_id(driver: WebDriver, element_id: str) -> WebElement:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def open_page(driver: WebDriver, server: Server) -> None:
    """Load the playground and wait until it has read the model card (it sets body[data-ready])."""
    driver.get(f"{server.url}/")
    wait_for(lambda: driver.execute_script("return document.body.dataset.ready === 'true'"), "the model card")


def fill(driver: WebDriver, element_id: str, value: str) -> None:
    field = by_id(driver, element_id)
    field.clear()
    field.send_keys(value)


def text_of(driver: WebDriver, element_id: str) -> str:
    value: str = driver.execute_script("return document.getElementById(arguments[0]).textContent", element_id)
    return value


def wait_state(driver: WebDriver, *prefixes: str) -> str:
    """The Generate tab's state once it starts with one of `prefixes` (done, stopped, error)."""
    def reached() -> str | None:
        state = text_of(driver, "gen-state")
        return state if state.startswith(prefixes) else None

    return wait_for(reached, f"the state to become one of {prefixes}")


def network_log(driver: WebDriver) -> tuple[dict[str, int], list[str], list[str]]:
    """From Chromium's performance log: status by URL, failed loads, and every URL requested."""
    statuses: dict[str, int] = {}
    failures: list[str] = []
    requested: list[str] = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        if message["method"] == "Network.requestWillBeSent":
            requested.append(params["request"]["url"])
        elif message["method"] == "Network.responseReceived":
            statuses[params["response"]["url"]] = params["response"]["status"]
        elif message["method"] == "Network.loadingFailed":
            failures.append(f"{params.get('type')}: {params.get('errorText')}")
    return statuses, failures, requested


def generate_on_page(driver: WebDriver, seed: str, length: int, **settings: str) -> None:
    """Type the settings (field id → value) and press Generate."""
    fill(driver, "seed", seed)
    fill(driver, "length", str(length))
    for field, value in settings.items():
        fill(driver, field, value)
    by_id(driver, "generate").click()


# ---------------------------------------------------------------- tests


def test_the_page_loads_offline_with_no_failed_request(server: Server, browser: WebDriver) -> None:
    for log in ("performance", "browser"):
        browser.get_log(log)  # drop what earlier pages left
    open_page(browser, server)
    statuses, failures, requested = network_log(browser)
    assert not failures, failures
    assert all(url.startswith(server.url) for url in requested), requested
    paths = {url.removeprefix(server.url): status for url, status in statuses.items()}
    assert {"/", "/static/playground.css", "/static/playground.js", "/info"} <= paths.keys(), paths
    assert all(status == 200 for status in paths.values()), paths
    errors = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors

    assert "parameters" in text_of(browser, "model-info")
    assert browser.execute_script("return document.querySelector('a[href=\"/docs\"]') !== null")
    # Every form control has a label the browser associates with it.
    unlabelled = browser.execute_script(
        "return Array.from(document.querySelectorAll('input, textarea, select'))"
        ".filter(e => !e.labels.length && !e.getAttribute('aria-label')).map(e => e.id)"
    )
    assert unlabelled == []


def test_narrow_screens_need_no_sideways_scrolling(server: Server, browser: WebDriver, tmp_path: Path) -> None:
    browser.set_window_size(360, 800)
    try:
        open_page(browser, server)
        for tab in ("tab-generate", "tab-score"):
            by_id(browser, tab).click()
            overflow = browser.execute_script(
                "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
            assert overflow <= 0, f"{tab}: {overflow}px wider than the screen"
            browser.save_screenshot(str(tmp_path / f"narrow-{tab}.png"))
    finally:
        browser.set_window_size(1100, 900)


def test_generate_streams_text_that_grows_then_is_done(server: Server, browser: WebDriver, tmp_path: Path) -> None:
    open_page(browser, server)
    seed = "The "
    # The page records the output's length at every change it makes, so intermediate lengths are
    # seen however fast the server or slow this test's polling. A server so fast that the whole
    # text comes in fewer than three events gets a longer text to write.
    for length in (20_000, 200_000, 2_000_000):
        browser.execute_script("""
            window.lengths = [];
            const output = document.getElementById('output');
            new MutationObserver(() => window.lengths.push(output.textContent.length))
                .observe(output, {childList: true, characterData: true, subtree: true});
        """)
        generate_on_page(browser, seed, length)
        assert wait_state(browser, "done", "error", "stopped") == "done: length", text_of(browser, "generate-error")
        final = len(text_of(browser, "output"))
        intermediate = {n for n in browser.execute_script("return window.lengths") if len(seed) < n < final}
        if len(intermediate) >= 2:
            break
    assert len(intermediate) >= 2, "the text never grew in steps"
    assert final == len(seed) + length
    assert text_of(browser, "gen-chars") == f"{length:,}"
    assert text_of(browser, "gen-ttfc").endswith(" ms")
    assert text_of(browser, "gen-rate").replace(",", "").isdigit()
    assert text_of(browser, "gen-seed").isdigit()
    browser.save_screenshot(str(tmp_path / "generate.png"))


def test_settings_reach_the_server_and_copy_curl_repeats_them(server: Server, browser: WebDriver) -> None:
    open_page(browser, server)
    fill(browser, "temperature", "0.5")
    assert by_id(browser, "scale-factor").get_attribute("value") == "2"
    settings = {"top-k": "10", "top-p": "0.9", "random-seed": "7"}
    generate_on_page(browser, "The sailor", 300, **settings)
    assert wait_state(browser, "done", "error") == "done: length", text_of(browser, "generate-error")
    shown = text_of(browser, "output")

    # The same request through the API gives the same text: every setting was sent as typed.
    body = {"seed": "The sailor", "length": 300, "scale_factor": 2, "top_k": 10, "top_p": 0.9, "random_seed": 7}
    assert httpx.post(f"{server.url}/generate", json=body, timeout=60).json()["text"] == shown

    by_id(browser, "copy-curl").click()
    command = wait_for(lambda: text_of(browser, "curl-command"), "the curl command")
    words = shlex.split(command.replace("\\\n", " "))  # parsed as a POSIX shell would
    assert words[:3] == ["curl", "-s", f"{server.url}/generate"]
    assert json.loads(words[words.index("-d") + 1]) == body
    assert "Authorization" not in command  # this server has no key
    # the status follows the clipboard's promise, after the command is shown: wait for it
    assert wait_for(lambda: text_of(browser, "copy-status"), "the copy status")

    by_id(browser, "new-seed").click()
    assert by_id(browser, "random-seed").get_attribute("value") not in ("", "7")


def test_stop_ends_the_stream_and_the_server_cancels_the_row(server: Server, browser: WebDriver) -> None:
    open_page(browser, server)
    before = server.metric("charlm_cancellations_total")
    generate_on_page(browser, "The ", MAX_LENGTH)
    wait_for(lambda: text_of(browser, "gen-chars") != "–", "the first characters")
    assert text_of(browser, "gen-state") == "streaming…"
    by_id(browser, "stop").click()
    assert wait_state(browser, "done", "error", "stopped") == "stopped"
    wait_for(lambda: server.metric("charlm_cancellations_total") > before, "the server to cancel the row")
    wait_for(lambda: server.metric("charlm_active_rows") == 0, "the row to be freed")
    assert by_id(browser, "generate").is_enabled() and not by_id(browser, "stop").is_enabled()


def test_an_unknown_character_is_named(server: Server, browser: WebDriver) -> None:
    open_page(browser, server)
    generate_on_page(browser, "Thé island €", 10)
    assert wait_state(browser, "done", "error", "stopped") == "error"
    message = text_of(browser, "generate-error")
    assert "“é” (U+00E9)" in message and "“€” (U+20AC)" in message, message


def test_score_colours_each_character_and_shows_the_bpc(server: Server, browser: WebDriver, tmp_path: Path) -> None:
    text = "The engineer and the sailor walked along the shore.\nThe boy gathered wood!"
    open_page(browser, server)
    by_id(browser, "tab-score").click()
    fill(browser, "score-text", text)
    by_id(browser, "score").click()
    from selenium.webdriver.common.by import By

    def scored() -> list[WebElement] | None:
        assert not text_of(browser, "score-error"), text_of(browser, "score-error")
        return browser.find_elements(By.CSS_SELECTOR, "#scored span.c")

    spans = wait_for(scored, "the scored text")
    expected = httpx.post(f"{server.url}/score", json={"text": text, "top_k": 5}, timeout=60).json()
    assert len(spans) == len(expected["per_char"]) == len(text)
    assert text_of(browser, "score-chars") == str(expected["chars"]) == str(len(text) - 1)  # the first is context

    # The bpc as the page shows it (3 decimals) is /score's, rounded.
    shown = text_of(browser, "score-bpc")
    assert shown == f"{float(shown):.3f}" and abs(float(shown) - expected["bits_per_char"]) <= 0.0005 + 1e-9
    # One span per character, in order; each predicted one with its surprise in bits, a colour and a tooltip.
    details: list[dict[str, Any]] = browser.execute_script(
        "return Array.from(document.querySelectorAll('#scored span.c')).map(s => ({text: s.textContent, "
        "bits: s.dataset.bits, colour: s.style.backgroundColor, title: s.title, context: s.matches('.context')}))"
    )
    assert details[0]["context"] and details[0]["bits"] is None and expected["per_char"][0]["logprob"] is None
    for char, item, span in zip(text[1:], expected["per_char"][1:], details[1:]):
        assert item["char"] == char
        assert span["text"] == ("↵\n" if char == "\n" else char)
        assert abs(float(span["bits"]) - (-item["logprob"] / math.log(2))) <= 0.0005 + 1e-9
        assert span["colour"].startswith("rgb") and "bits" in span["title"] and "guesses" in span["title"]
        assert not span["context"]
    assert len({span["colour"] for span in details[1:]}) > 1, "every character has the same colour"
    browser.save_screenshot(str(tmp_path / "score.png"))


@pytest.fixture(scope="module")
def keyed_server(tiny_checkpoint_path: Path) -> Iterator[Server]:
    """A server with an API key and room for one row and one waiting request, to fill up at will."""
    env = {**SERVER_ENV, "CHARLM_API_KEY": API_KEY, "CHARLM_MAX_BATCH": "1", "CHARLM_MAX_QUEUE": "1"}
    with running_server(tiny_checkpoint_path, **env) as running:
        yield running


def occupy(server: Server) -> socket.socket:
    """Open a request for a very long generation and leave it running (or waiting); close to cancel."""
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"seed": "The ", "length": MAX_LENGTH}).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


def keyed_metric(server: Server, name: str) -> float:
    """Server.metric with the key (this server's /metrics needs it too)."""
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_api_key_is_asked_once_and_a_full_queue_says_when_to_retry(keyed_server: Server, browser: WebDriver) -> None:
    server = keyed_server
    browser.get(f"{server.url}/")  # a new origin: its session storage starts empty
    dialog_open = "return document.getElementById('key-dialog').open"
    wait_for(lambda: browser.execute_script(dialog_open), "the API key dialog")
    fill(browser, "api-key", "wrong")
    by_id(browser, "key-submit").click()
    wait_for(lambda: "refused" in text_of(browser, "key-error"), "the wrong key to be refused")
    fill(browser, "api-key", API_KEY)
    by_id(browser, "key-submit").click()
    wait_for(lambda: browser.execute_script("return document.body.dataset.ready === 'true'"), "the model card")
    assert browser.execute_script("return sessionStorage.getItem('charlm.apiKey')") == API_KEY

    open_page(browser, server)  # reloaded: the key is kept for the tab's session, no second question
    assert not browser.execute_script(dialog_open)
    by_id(browser, "copy-curl").click()
    command = wait_for(lambda: text_of(browser, "curl-command"), "the curl command")
    assert "Authorization: Bearer $CHARLM_API_KEY" in command and API_KEY not in command

    running, waiting = occupy(server), None
    try:
        wait_for(lambda: keyed_metric(server, "charlm_active_rows") == 1, "the one row to be taken")
        waiting = occupy(server)
        wait_for(lambda: keyed_metric(server, "charlm_queue_depth") == 1, "the queue to fill")
        generate_on_page(browser, "The ", 10)
        assert wait_state(browser, "done", "error", "stopped") == "error"
        message = text_of(browser, "generate-error")
        assert "busy" in message and "Retry after 1 s" in message, message
    finally:
        for sock in (running, waiting):
            if sock is not None:
                sock.close()
    wait_for(lambda: keyed_metric(server, "charlm_active_rows") + keyed_metric(server, "charlm_queue_depth") == 0,
             "the occupying requests to be cancelled")
    by_id(browser, "generate").click()
    assert wait_state(browser, "done", "error", "stopped") == "done: length", text_of(browser, "generate-error")


@pytest.mark.skipif(not UPDATE_SCREENSHOT, reason="set CHARLM_UPDATE_SCREENSHOT=1 to redraw docs/playground.png")
def test_readme_screenshot(server: Server, browser: WebDriver) -> None:
    browser.set_window_size(1000, 820)
    try:
        open_page(browser, server)
        generate_on_page(browser, "The island", 400, **{"scale-factor": "2", "random-seed": "1"})
        assert wait_state(browser, "done", "error", "stopped") == "done: length"
        # Tall enough for the whole page, so the picture shows the whole text.
        gap = browser.get_window_size()["height"] - browser.execute_script("return window.innerHeight")
        browser.set_window_size(1000, gap + browser.execute_script("return document.documentElement.scrollHeight"))
        (ROOT / "docs").mkdir(exist_ok=True)
        browser.save_screenshot(str(ROOT / "docs" / "playground.png"))
    finally:
        browser.set_window_size(1100, 900)
