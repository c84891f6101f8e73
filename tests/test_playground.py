"""The playground page (GET /) in headless Chromium against a real uvicorn process, with every host
but loopback unresolvable, so the page is proven to work offline.

Waits are bounded loops on what the page or the server shows, never fixed sleeps. Set
CHARLM_UPDATE_SCREENSHOT=1 to serve the shipped model instead of the tiny one and redraw
docs/playground.png for the README.
"""

from __future__ import annotations

import base64
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


def posted_bodies(driver: WebDriver, url: str) -> list[dict[str, Any]]:
    """From Chromium's performance log: the JSON bodies of the POSTs to `url` since the log was last read."""
    bodies = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] != "Network.requestWillBeSent":
            continue
        request = message["params"]["request"]
        if request["url"] == url and request["method"] == "POST":
            data = request.get("postData")
            if data is None:  # newer Chromium may give only the entries, base64-encoded
                data = b"".join(base64.b64decode(part.get("bytes", "")) for part in request["postDataEntries"]).decode()
            bodies.append(json.loads(data))
    return bodies


def default_model(server: Server) -> str:
    """The id of the model the server serves by default, as GET /v1/models says."""
    models = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]
    model_id: str = next(m["id"] for m in models if m["default"])
    return model_id


def pick(driver: WebDriver, element_id: str, value: str) -> None:
    """Choose the option with `value` in a <select>, as a person would (it fires `change`)."""
    from selenium.webdriver.support.select import Select

    Select(by_id(driver, element_id)).select_by_value(value)


def options_of(driver: WebDriver, element_id: str) -> dict[str, dict[str, Any]]:
    """A <select>'s options by value: their text, and whether each is disabled or selected."""
    options: dict[str, dict[str, Any]] = driver.execute_script(
        "return Object.fromEntries(Array.from(document.getElementById(arguments[0]).options).map(o => "
        "[o.value, {text: o.textContent, disabled: o.disabled, selected: o.selected}]))", element_id)
    return options


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
    assert {"/", "/static/playground.css", "/static/playground.js", "/info", "/v1/models"} <= paths.keys(), paths
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

    # The same request through the API gives the same text: every setting was sent as typed, and the
    # model picked (the default) is named.
    body = {"model": default_model(server), "seed": "The sailor", "length": 300, "scale_factor": 2, "top_k": 10,
            "top_p": 0.9, "random_seed": 7}
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


STEERING_HELP = ("ban-chars", "boost-chars", "boost-bias", "presence-penalty", "frequency-penalty",
                 "repetition-penalty", "min-p")


def test_banned_characters_never_appear_and_the_body_carries_the_bias(server: Server, browser: WebDriver) -> None:
    open_page(browser, server)
    browser.get_log("performance")  # drop what earlier pages left
    seed = "The "
    generate_on_page(browser, seed, 300, **{"ban-chars": "e ", "random-seed": "3"})
    assert wait_state(browser, "done", "error", "stopped") == "done: length", text_of(browser, "generate-error")
    shown = text_of(browser, "output")
    assert shown.startswith(seed) and len(shown) == len(seed) + 300
    generated = shown[len(seed):]
    assert "e" not in generated and " " not in generated, generated

    # What the page sent: the ban as logit_bias, and nothing for the steering settings left off.
    [body] = posted_bodies(browser, f"{server.url}/generate/stream")
    assert body == {"model": default_model(server), "seed": seed, "length": 300, "scale_factor": 2,
                    "random_seed": 3, "logit_bias": {"e": -100, " ": -100}}
    # The API gives the same text for that body; without the ban, this seed's text has both characters.
    assert httpx.post(f"{server.url}/generate", json=body, timeout=60).json()["text"] == shown
    unbanned = httpx.post(f"{server.url}/generate", json={k: v for k, v in body.items() if k != "logit_bias"},
                          timeout=60).json()["text"][len(seed):]
    assert "e" in unbanned and " " in unbanned, "the ban is untested: the text has no e or no space anyway"


def test_steering_settings_are_sent_only_when_on_and_a_ban_beats_a_boost(server: Server,
                                                                        browser: WebDriver) -> None:
    open_page(browser, server)

    def curl_body() -> dict[str, Any]:
        by_id(browser, "copy-curl").click()
        command = wait_for(lambda: text_of(browser, "curl-command"), "the curl command")
        words = shlex.split(command.replace("\\\n", " "))
        sent: dict[str, Any] = json.loads(words[words.index("-d") + 1])
        browser.execute_script("document.getElementById('curl-command').textContent = ''")
        return sent

    steering = {"logit_bias", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"}
    assert not steering & curl_body().keys()  # every one at its "off" value: none sent
    settings = {"ban-chars": "xe", "boost-chars": "aeaé", "boost-bias": "7.5", "presence-penalty": "0.5",
                "frequency-penalty": "-0.25", "repetition-penalty": "1.2", "min-p": "0.05"}
    for field, value in settings.items():
        fill(browser, field, value)
    body = curl_body()
    # Deduplicated, one key per character (é is one); e is both banned and boosted: banned.
    assert body["logit_bias"] == {"x": -100, "e": -100, "a": 7.5, "é": 7.5}
    assert {k: body[k] for k in steering - {"logit_bias"}} == {
        "presence_penalty": 0.5, "frequency_penalty": -0.25, "repetition_penalty": 1.2, "min_p": 0.05}
    # Back at the "off" values (or empty): nothing sent again; a boost of 0 changes nothing either.
    for field, value in {"ban-chars": "", "boost-bias": "0", "presence-penalty": "0", "frequency-penalty": "",
                         "repetition-penalty": "1", "min-p": "0"}.items():
        fill(browser, field, value)
    assert not steering & curl_body().keys()

    # Each control has a line of help.
    for control in STEERING_HELP:
        help_id = by_id(browser, control).get_attribute("aria-describedby")
        assert help_id and len(text_of(browser, help_id).split()) > 5, control


def test_an_out_of_range_steering_value_shows_the_servers_refusal(server: Server, browser: WebDriver) -> None:
    open_page(browser, server)
    fill(browser, "min-p", "1.5")
    # The box's own range catches it first (the browser will not submit the form) ...
    assert browser.execute_script("return document.getElementById('min-p').validity.rangeOverflow")
    # ... so skip the browser's check, to see the server's answer shown.
    browser.execute_script("document.getElementById('generate-form').noValidate = true")
    generate_on_page(browser, "The ", 50)
    assert wait_state(browser, "done", "error", "stopped") == "error"
    message = text_of(browser, "generate-error")
    refused = httpx.post(f"{server.url}/generate", json={"seed": "The ", "length": 50, "min_p": 1.5}, timeout=10)
    assert refused.status_code == 422
    [detail] = refused.json()["error"]["details"]
    assert detail["field"] == "min_p"
    assert message == f"The server refused the request:\nmin_p: {detail['message']}", message
    assert text_of(browser, "output") == ""  # refused: nothing was generated

    # A banned character outside the model's vocabulary is named as the seed's are.
    fill(browser, "min-p", "0")
    fill(browser, "ban-chars", "€")
    by_id(browser, "generate").click()

    def bias_refused() -> str | None:
        shown = text_of(browser, "generate-error")
        return shown if "logit_bias" in shown else None

    message = wait_for(bias_refused, "the bias to be refused")
    assert text_of(browser, "gen-state") == "error"
    assert "logit_bias: unknown characters “€” (U+20AC)" in message, message


def test_a_choice_constraint_makes_the_text_one_of_the_choices(server: Server, browser: WebDriver) -> None:
    open_page(browser, server)
    assert not by_id(browser, "constraint-kind").get_attribute("value")  # none: nothing to type yet
    assert not by_id(browser, "constraint-text").is_enabled()
    for control in ("constraint-kind", "constraint-text"):
        help_id = by_id(browser, control).get_attribute("aria-describedby")
        assert help_id and text_of(browser, help_id).split() == (
            "The generated text will match this exactly: each step allows only characters that can still "
            "complete a match; a choice is drawn whole, as often as the model finds it likely.").split(), control

    # A schema that is not JSON is named on the page, and nothing is sent.
    pick(browser, "constraint-kind", "json")
    fill(browser, "constraint-text", '{"type": ')
    browser.get_log("performance")  # drop what earlier requests left
    by_id(browser, "generate").click()
    assert "not valid JSON" in wait_for(lambda: text_of(browser, "generate-error"), "the JSON error")
    assert posted_bodies(browser, f"{server.url}/generate/stream") == []

    # One choice per line, empty lines skipped. (The tiny model has no "m": only Sara can be written.)
    pick(browser, "constraint-kind", "choice")
    fill(browser, "constraint-text", "Tom\n\nSara\n")
    seed = "The "
    generate_on_page(browser, seed, 30, **{"random-seed": "5"})
    assert wait_state(browser, "done", "error", "stopped") == "done: stop", text_of(browser, "generate-error")
    assert not text_of(browser, "generate-error")
    shown = text_of(browser, "output")
    assert shown.startswith(seed) and shown.removeprefix(seed) in ("Tom", "Sara"), shown
    assert by_id(browser, "gen-note").get_attribute("hidden") is not None  # a complete match: no note
    [sent] = posted_bodies(browser, f"{server.url}/generate/stream")
    assert sent["constraint"] == {"choice": ["Tom", "Sara"]} and sent["random_seed"] == 5

    # Cut short by the length, the page says the match is incomplete.
    generate_on_page(browser, seed, 2)
    assert wait_state(browser, "done", "error", "stopped") == "done: length", text_of(browser, "generate-error")
    assert "cut short by the length" in text_of(browser, "gen-note")
    assert by_id(browser, "gen-note").get_attribute("hidden") is None

    # Back to none: no constraint is sent, whatever the box holds.
    pick(browser, "constraint-kind", "")
    browser.get_log("performance")
    generate_on_page(browser, seed, 5)
    assert wait_state(browser, "done", "error", "stopped") == "done: length"
    assert by_id(browser, "gen-note").get_attribute("hidden") is not None
    [sent] = posted_bodies(browser, f"{server.url}/generate/stream")
    assert "constraint" not in sent


def test_a_regex_that_does_not_compile_shows_the_servers_refusal(server: Server, browser: WebDriver) -> None:
    open_page(browser, server)
    pick(browser, "constraint-kind", "regex")
    fill(browser, "constraint-text", "(")
    generate_on_page(browser, "The ", 20)
    assert wait_state(browser, "done", "error", "stopped") == "error"
    message = text_of(browser, "generate-error")
    refused = httpx.post(f"{server.url}/generate", json={"seed": "The ", "length": 20, "constraint": {"regex": "("}},
                         timeout=30)
    assert refused.status_code == 422
    [detail] = refused.json()["error"]["details"]
    assert detail["field"] == "constraint.regex"
    assert message == f"The server refused the request:\nconstraint.regex: {detail['message']}", message
    assert text_of(browser, "output") == ""  # refused: nothing was generated


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


# ---------------------------------------------------------------- two models on one server


@pytest.fixture(scope="module")
def model_files(tiny_checkpoint_path: Path, corpus_path: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> dict[str, Path]:
    """Two tiny models that differ (another width, another initialisation), and a file that does not
    load: what the pickers list."""
    from charlm.train import train
    from tests.conftest import tiny_config

    out = tmp_path_factory.mktemp("models")
    second = out / "second.safetensors"
    train(tiny_config(corpus_path, second, hidden=32, random_seed=7, steps=100))
    broken = out / "broken.safetensors"
    broken.write_bytes(b"not a model")
    return {"a": tiny_checkpoint_path, "b": second, "broken": broken}


@pytest.fixture(scope="module")
def two_model_server(model_files: dict[str, Path]) -> Iterator[Server]:
    models = ",".join(f"{model_id}={path}" for model_id, path in model_files.items())
    with running_server(None, **SERVER_ENV, CHARLM_MODELS=models, CHARLM_DEFAULT_MODEL="a") as running:
        yield running


def models_listed(server: Server) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]}


def short_count(n: int) -> str:
    """playground.js's shortCount for the sizes of tiny models: 30_432 -> "30k" (halves round up)."""
    assert 1000 <= n < 999_500
    return f"{math.floor(n / 1000 + 0.5)}k"


def test_the_model_picker_lists_the_models_and_picks_the_default(two_model_server: Server,
                                                                 browser: WebDriver) -> None:
    server = two_model_server
    open_page(browser, server)
    listed = models_listed(server)
    assert listed["a"]["status"] == "loaded" and listed["b"]["status"] == "available"  # b is not used yet
    assert listed["broken"]["status"] == "unavailable"

    options = options_of(browser, "model")
    assert list(options) == ["a", "b", "broken"]
    for model_id in ("a", "b"):
        text, model = options[model_id]["text"], listed[model_id]
        assert f"{short_count(model['parameters'])} parameters" in text, text
        assert f"{model['bits_per_char']:.3f} bpc" in text, text
        assert not options[model_id]["disabled"]
    assert options["a"]["text"].startswith("a (default) · ") and options["a"]["text"].endswith(" · loaded")
    assert options["b"]["text"].startswith("b · ") and options["b"]["text"].endswith(" · loads on first use")
    assert options["broken"]["disabled"] and options["broken"]["text"] == (
        f"broken · unavailable: {listed['broken']['error']}")
    assert [m for m, o in options.items() if o["selected"]] == ["a"]
    assert listed["a"]["parameters"] != listed["b"]["parameters"]  # two different models

    # The header's card is the picked model's, and follows the picker.
    info = {card["id"]: card for card in httpx.get(f"{server.url}/info", timeout=10).json()["models"]}
    for model_id in ("a", "b"):
        pick(browser, "model", model_id)
        card = text_of(browser, "model-info")
        assert info[model_id]["checkpoint"] in card and f"{info[model_id]['parameters']:,} parameters" in card
        # The Score tab's second picker offers none and every other usable model, never the picked one.
        compare = options_of(browser, "compare-model")
        assert list(compare) == ["", "a", "b", "broken"] and compare[""]["text"] == "none"
        assert [m for m, o in compare.items() if not o["disabled"]] == ["", "b" if model_id == "a" else "a"]
    # Each new control has a line of help.
    for control in ("model", "compare-model"):
        help_id = by_id(browser, control).get_attribute("aria-describedby")
        assert help_id and len(text_of(browser, help_id).split()) > 5


def test_generating_with_the_second_model_says_which_model_made_the_text(two_model_server: Server,
                                                                        browser: WebDriver) -> None:
    server = two_model_server
    open_page(browser, server)
    pick(browser, "model", "b")
    generate_on_page(browser, "The ", 200, **{"random-seed": "11"})
    assert wait_state(browser, "done", "error", "stopped") == "done: length", text_of(browser, "generate-error")
    shown = text_of(browser, "output")

    # Model b's text, as the API gives it for the same settings; model a's is another text.
    body = {"seed": "The ", "length": 200, "scale_factor": 2, "random_seed": 11}
    made = {m: httpx.post(f"{server.url}/generate", json={**body, "model": m}, timeout=60).json() for m in "ab"}
    assert made["b"]["text"] == shown and made["b"]["model"] == "b"
    assert made["a"]["text"] != shown, "the two models wrote the same text: the test cannot tell them apart"
    assert text_of(browser, "gen-model") == f"b {made['b']['model_version']}"

    # The curl command repeats the model, and the picker has seen that b is loaded now.
    by_id(browser, "copy-curl").click()
    command = wait_for(lambda: text_of(browser, "curl-command"), "the curl command")
    words = shlex.split(command.replace("\\\n", " "))
    assert json.loads(words[words.index("-d") + 1])["model"] == "b"
    wait_for(lambda: options_of(browser, "model")["b"]["text"].endswith(" · loaded"), "b to be shown as loaded")
    assert options_of(browser, "model")["b"]["selected"]


def test_score_compares_two_models_side_by_side(two_model_server: Server, browser: WebDriver,
                                                tmp_path: Path) -> None:
    server = two_model_server
    text = "The engineer and the sailor walked.\nThe boy gathered wood!"
    open_page(browser, server)
    by_id(browser, "tab-score").click()
    fill(browser, "score-text", text)
    pick(browser, "compare-model", "b")
    by_id(browser, "score").click()

    def shown(selector: str) -> int:
        assert not text_of(browser, "score-error"), text_of(browser, "score-error")
        count: int = browser.execute_script("return document.querySelectorAll(arguments[0]).length", selector)
        return count

    wait_for(lambda: shown("#compared .pair"), "the compared text")
    expected = {m: httpx.post(f"{server.url}/score", json={"text": text, "model": m, "top_k": 5, "per_char": True},
                              timeout=60).json() for m in "ab"}
    assert by_id(browser, "score-summary").get_attribute("hidden") is not None  # the single view is not shown

    # One table row per model, in row order: the model and its version, and its bpc as /score gives it.
    rows: list[dict[str, Any]] = browser.execute_script(
        "return Array.from(document.querySelectorAll('#compare-rows tr')).map(tr => "
        "({model: tr.dataset.model, cells: Array.from(tr.cells).map(c => c.textContent)}))")
    assert [row["model"] for row in rows] == ["a", "b"]
    for row, place in zip(rows, ("top", "bottom")):
        result = expected[row["model"]]
        label, made_by, bpc = row["cells"][:3]
        assert label == place and made_by == f"{result['model']} {result['model_version']}"
        assert bpc == f"{float(bpc):.3f}" and abs(float(bpc) - result["bits_per_char"]) <= 0.0005 + 1e-9
    better = min("ab", key=lambda m: expected[m]["bits_per_char"])
    assert f"{better} predicts this text better" in text_of(browser, "compare-verdict")

    # Two rows of the text, one per model, aligned character by character: each column holds the
    # character once per model (top a, bottom b) with that model's surprise.
    columns: list[list[dict[str, Any]]] = browser.execute_script(
        "return Array.from(document.querySelectorAll('#compared .pair')).map(p => Array.from(p.children).map(c => {"
        "const r = c.getBoundingClientRect(); return {text: c.textContent, model: c.dataset.model, "
        "bits: c.dataset.bits, better: c.classList.contains('better'), left: r.left, top: r.top, "
        "bottom: r.bottom}; }))")
    assert len(columns) == len(text)
    lines = set()
    for i, (char, (top, bottom)) in enumerate(zip(text, columns)):
        assert (top["model"], bottom["model"]) == ("a", "b")
        assert top["text"] == bottom["text"] == ("↵" if char == "\n" else char)
        assert abs(top["left"] - bottom["left"]) < 0.5 and top["bottom"] <= bottom["top"] + 0.5
        lines.add(round(top["top"]))
        if i == 0:  # the context character: scored by neither
            assert top["bits"] is None and bottom["bits"] is None
            continue
        bits = []
        for cell in (top, bottom):
            logprob = expected[cell["model"]]["per_char"][i]["logprob"]
            assert abs(float(cell["bits"]) - (-logprob / math.log(2))) <= 0.0005 + 1e-9
            bits.append(-logprob / math.log(2))
        # The model much less surprised (by a bit or more) is marked in its row; near ties are not.
        # (Exactly 1 bit apart is left unchecked: the page's arithmetic may round either way.)
        if abs(abs(bits[0] - bits[1]) - 1) > 1e-6:
            assert [top["better"], bottom["better"]] == [
                abs(bits[0] - bits[1]) > 1 and bits[0] < bits[1], abs(bits[0] - bits[1]) > 1 and bits[1] < bits[0]]
    assert len(lines) >= 2  # the newline started a new line of columns
    browser.save_screenshot(str(tmp_path / "compare.png"))
    # On a narrow screen the columns wrap, word by word, without sideways scrolling.
    browser.set_window_size(360, 800)
    try:
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"the comparison is {overflow}px wider than the screen"
        browser.save_screenshot(str(tmp_path / "compare-narrow.png"))
    finally:
        browser.set_window_size(1100, 900)

    # With no second model, the single view is back, scored by the picked model.
    pick(browser, "compare-model", "")
    by_id(browser, "score").click()
    wait_for(lambda: shown("#scored span.c") and not shown("#compared .pair"), "the single scored text")
    assert text_of(browser, "score-model") == f"a {expected['a']['model_version']}"
    assert by_id(browser, "compare-summary").get_attribute("hidden") is not None


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
