"""What one request may make the server hold, through `TestClient`: the size of a /v1 response, the
queue places of its scoring jobs, the refusals that say what to change, and the headers every page
carries. The same bounds against a live server, with clients that never read, are in test_connections.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.budget import BudgetExhausted, LogprobBudget
from app.errors import scoring_stopped_error
from app.main import create_app
from app.openai_api.protocol import Completion
from app.openai_api.serving import engine_error
from app.routes.health import public_summary
from charlm.request import ScoringStopped
from tests.test_openai import MODEL, assert_openai_error
from tests.test_service import assert_error, settings_for

PROMPT = ("the engineer and the sailor walked along the shore of the island " * 160)[:10_000]


@pytest.fixture(scope="module")
def client(tiny_checkpoint_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tiny_checkpoint_path, max_batch=64))) as c:
        yield c


def test_the_reviewed_amplifying_request_is_refused_naming_logprobs_and_the_limit(client: TestClient) -> None:
    # 10 kB that made a 117 MB response and took the server past its memory limit: refused up front.
    request = {"model": MODEL, "prompt": PROMPT, "echo": True, "logprobs": 5, "n": 64, "max_tokens": 2000}
    message = assert_openai_error(client.post("/v1/completions", json=request), 400, "logprobs")
    limit = client.get("/info").json()["limits"]["max_logprob_values"]
    assert f"{limit:,}" in message and "max_logprob_values" in message and "4,608,000" in message
    # one choice of the same is within the limit, and answered
    request["n"] = 1
    body = client.post("/v1/completions", json=request).json()
    assert len(body["choices"][0]["logprobs"]["tokens"]) == len(PROMPT) + 2000


def test_a_whole_response_is_openais_object_with_the_prompts_logprobs_shared(client: TestClient) -> None:
    prompts = ["The engineer", "The sailor"]
    request = {"model": MODEL, "prompt": prompts, "n": 3, "echo": True, "logprobs": 2, "max_tokens": 30, "seed": 5}
    r = client.post("/v1/completions", json=request)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    completion = Completion.model_validate_json(r.content)  # the schema the API page promises
    assert [c.index for c in completion.choices] == list(range(6))
    for c in completion.choices:
        prompt = prompts[c.index // 3]
        assert c.logprobs is not None and c.text.startswith(prompt)
        scored = client.post("/score", json={"text": prompt, "top_k": 2}).json()["per_char"]
        assert c.logprobs.token_logprobs[: len(prompt)] == [e["logprob"] for e in scored]
        assert c.logprobs.text_offset == list(range(len(c.text)))
    assert completion.usage is not None and completion.usage.completion_tokens == 6 * 30


def test_echo_scoring_jobs_count_against_max_choices(tiny_checkpoint_path: Path) -> None:
    with TestClient(create_app(settings_for(tiny_checkpoint_path, max_batch=16))) as c:
        request = {"model": MODEL, "prompt": ["The ", "wood"], "n": 8, "max_tokens": 5}
        assert c.post("/v1/completions", json=request).status_code == 200  # 16 places: the limit
        message = assert_openai_error(c.post("/v1/completions", json={**request, "echo": True, "logprobs": 1}),
                                      400, "n")
        assert "18 queue places" in message and "scoring" in message


def test_a_scoring_timeout_while_waiting_is_retryable(tiny_checkpoint_path: Path) -> None:
    with TestClient(create_app(settings_for(tiny_checkpoint_path, request_timeout=1e-9))) as c:
        r = c.post("/score", json={"text": "The engineer and the sailor"})
        assert assert_error(r, 503, "not_ready") and r.headers["retry-after"] == "1"
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "The engineer", "max_tokens": 0, "echo": True,
                                            "logprobs": 1})
        assert "busy" in assert_openai_error(r, 503) and r.headers["retry-after"] == "1"


def test_a_scoring_timeout_once_started_says_to_send_less_and_is_not_retryable() -> None:
    error = scoring_stopped_error(ScoringStopped("timeout", started=True), "text")
    assert error.status == 422 and error.headers is None and "shorter" in error.message
    assert error.details[0]["field"] == "text" and error.param == "text"
    on_v1 = engine_error(ScoringStopped("timeout", started=True))
    assert on_v1.status == 422 and on_v1.param == "prompt"  # answered as OpenAI's 400 on /v1


@pytest.mark.parametrize("path", ["/generate", "/generate/stream", "/score", "/v1/completions"])
def test_a_body_that_does_not_parse_hears_401_first_without_the_key(tiny_checkpoint_path: Path, path: str) -> None:
    with TestClient(create_app(settings_for(tiny_checkpoint_path, api_key="s3cret"))) as c:
        unreadable = b'{"seed": "\xff\xfe"}'  # not UTF-8
        r = c.post(path, content=unreadable, headers={"content-type": "application/json"})
        assert r.status_code == 401, r.text
        r = c.post(path, content=unreadable, headers={"content-type": "application/json",
                                                      "authorization": "Bearer s3cret"})
        assert r.status_code == 400 and "UTF-8" in r.json()["error"]["message"]


def test_info_shows_corpus_names_sizes_and_checksums_but_no_paths(client: TestClient, corpus_path: Path) -> None:
    info = client.get("/info").json()
    assert str(corpus_path.parent) not in str(info)
    [corpus] = info["training"]["corpora"]
    assert corpus["name"] == corpus_path.name and len(corpus["sha256"]) == 64 and corpus["train_chars"] > 0
    assert "source" not in corpus
    summary: dict[str, Any] = {"corpora": [{"name": "a.txt", "source": "https://www.gutenberg.org/ebooks/1268"},
                           {"name": "b.txt", "source": "../shared/data/verne/103.txt"}],
               "init_from": {"corpora": [{"name": "c.txt", "source": "/home/me/c.txt"}]}}
    assert public_summary(summary) == {"corpora": [summary["corpora"][0], {"name": "b.txt"}],
                                       "init_from": {"corpora": [{"name": "c.txt"}]}}


def test_every_response_carries_the_defence_headers(client: TestClient) -> None:
    for path in ("/", "/docs", "/health", "/info"):
        headers = client.get(path).headers
        assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY", path
        assert "frame-ancestors 'none'" in headers["content-security-policy"], path
    page = client.get("/").headers["content-security-policy"]
    assert "script-src 'self';" in page and "unsafe-inline" not in page and "default-src 'self'" in page


def test_the_held_logprobs_budget() -> None:
    budget = LogprobBudget(limit=1000)
    first = budget.take(600)
    with pytest.raises(BudgetExhausted, match="600"):
        budget.take(401)
    free = budget.take(0)  # a request without logprobs always passes
    first.release()
    first.release()  # idempotent: every exit path may release
    assert budget.held == 0 and budget.take(1000).values == 1000
    free.release()


def test_the_server_wide_bound_must_hold_one_largest_response(tiny_checkpoint_path: Path) -> None:
    with pytest.raises(ValidationError, match="MAX_LOGPROB_VALUES_HELD"):
        settings_for(tiny_checkpoint_path, max_logprob_values=1000, max_logprob_values_held=999)


