"""The OpenAI-compatible routes through `TestClient`: the completions fields, OpenAI's error shape, the
API page. The `openai` SDK against a live server is in test_process.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from charlm.checkpoint import Checkpoint
from charlm.engine import EngineHooks
from charlm.request import GenerationRequest
from tests.conftest import default_engine
from tests.test_engine import ENDLESS, greedy, hold_the_row
from tests.test_service import explode_seed_99, settings_for

MODEL = "tiny"  # the served id: the checkpoint file's stem


@pytest.fixture(scope="module")
def client(tiny_checkpoint_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tiny_checkpoint_path, max_length=800, max_batch=16))) as c:
        yield c


def complete(client: TestClient, **body: Any) -> dict[str, Any]:
    r = client.post("/v1/completions", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


def assert_openai_error(response: Any, status: int, param: str | None = None, code: str | None = None) -> str:
    """OpenAI's shape, exactly: {"error": {"message", "type", "param", "code"}}; returns the message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert error["message"] and error["type"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    message: str = error["message"]
    return message


def test_models(client: TestClient) -> None:
    listed = client.get("/v1/models").json()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == [MODEL]
    card = client.get(f"/v1/models/{MODEL}").json()
    assert card == listed["data"][0] and card["object"] == "model" and card["owned_by"] == "charlm"
    assert isinstance(card["created"], int) and card["created"] > 0
    assert_openai_error(client.get("/v1/models/gpt-4"), 404, "model", "model_not_found")


def test_plain_completion(client: TestClient) -> None:
    body = complete(client, prompt="The ", max_tokens=40, seed=3)
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == MODEL
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and len(choice["text"]) == 40 and choice["finish_reason"] == "length"
    assert choice["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 40, "total_tokens": 44}
    assert complete(client, prompt="The ", max_tokens=40, seed=3)["choices"][0]["text"] == choice["text"]
    # choice 0 with seed s is POST /generate with random_seed s and scale_factor 1/temperature
    native = client.post("/generate", json={"seed": "The ", "length": 40, "random_seed": 3}).json()
    assert native["generated"] == choice["text"]
    warm = complete(client, prompt="The ", max_tokens=40, seed=3, temperature=0.5)["choices"][0]["text"]
    assert warm == client.post("/generate", json={"seed": "The ", "length": 40, "random_seed": 3,
                                                  "scale_factor": 2.0}).json()["generated"]


def test_max_tokens_defaults_to_16_and_0_gives_no_text(client: TestClient) -> None:
    assert len(complete(client, prompt="The ")["choices"][0]["text"]) == 16
    empty = complete(client, prompt="The ", max_tokens=0)
    assert empty["choices"][0]["text"] == "" and empty["choices"][0]["finish_reason"] == "length"
    assert empty["usage"]["completion_tokens"] == 0


def test_temperature_0_is_greedy(client: TestClient, tiny: Checkpoint) -> None:
    texts = [complete(client, prompt="The engineer", max_tokens=100, temperature=0, seed=s)["choices"][0]["text"]
             for s in (1, 2)]
    assert texts[0] == texts[1] == greedy(tiny, "The engineer", 100)
    assert complete(client, prompt="The engineer", max_tokens=100, top_p=0)["choices"][0]["text"] == texts[0]


def test_n_choices_and_a_list_of_prompts(client: TestClient) -> None:
    body = complete(client, prompt=["The ", "wood"], n=3, max_tokens=30, seed=11)
    choices = body["choices"]
    assert [c["index"] for c in choices] == list(range(6))
    assert len({c["text"] for c in choices}) == 6  # each choice draws its own characters
    again = complete(client, prompt=["The ", "wood"], n=3, max_tokens=30, seed=11)["choices"]
    assert [c["text"] for c in again] == [c["text"] for c in choices]
    alone = complete(client, prompt="wood", n=3, max_tokens=30, seed=11)["choices"]
    assert [c["text"] for c in alone] == [c["text"] for c in choices[3:]]  # choice j of a prompt: its own seed
    assert body["usage"] == {"prompt_tokens": 8, "completion_tokens": 180, "total_tokens": 188}


def test_token_id_prompts_are_characters(client: TestClient, tiny: Checkpoint) -> None:
    ids = tiny.vocab.encode("The ").tolist()
    by_ids = complete(client, prompt=ids, max_tokens=20, seed=5, echo=True)["choices"][0]["text"]
    assert by_ids == complete(client, prompt="The ", max_tokens=20, seed=5, echo=True)["choices"][0]["text"]
    two = complete(client, prompt=[ids, ids[:2]], max_tokens=1, seed=5, echo=True)["choices"]
    assert [c["text"][:-1] for c in two] == ["The ", "Th"]
    message = assert_openai_error(client.post("/v1/completions", json={"model": MODEL, "prompt": [1, 5000]}),
                                  400, "prompt")
    assert "5000" in message


def test_stop_strings(client: TestClient) -> None:
    base = complete(client, prompt="The ", max_tokens=200, seed=3)["choices"][0]["text"]
    stop = base[30:33]
    for stops in (stop, [stop, "@@@"]):
        choice = complete(client, prompt="The ", max_tokens=200, seed=3, stop=stops, logprobs=1)["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["text"] == base[: base.index(stop)]
        assert "".join(choice["logprobs"]["tokens"]) == choice["text"]


def test_echo(client: TestClient) -> None:
    plain = complete(client, prompt="The ", max_tokens=20, seed=8)["choices"][0]["text"]
    assert complete(client, prompt="The ", max_tokens=20, seed=8, echo=True)["choices"][0]["text"] == "The " + plain
    assert complete(client, prompt="The ", max_tokens=0, echo=True)["choices"][0]["text"] == "The "


def test_logprobs_object(client: TestClient) -> None:
    prompt = "The engineer"
    choice = complete(client, prompt=prompt, max_tokens=25, seed=4, logprobs=3)["choices"][0]
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert "".join(lp["tokens"]) == choice["text"] and len(lp["tokens"]) == 25
    assert lp["text_offset"] == list(range(len(prompt), len(prompt) + 25))  # counted from the prompt's start
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert logprob <= 0 and 3 <= len(top) <= 4 and top[token] == logprob  # the chosen one is always there
        best = sorted(top.values(), reverse=True)[:3]
        assert all(v <= best[0] for v in top.values())
    zero = complete(client, prompt=prompt, max_tokens=25, seed=4, logprobs=0)["choices"][0]["logprobs"]
    assert zero["top_logprobs"] == [{t: v} for t, v in zip(zero["tokens"], zero["token_logprobs"])]
    assert zero["token_logprobs"] == pytest.approx(lp["token_logprobs"])
    assert complete(client, prompt=prompt, max_tokens=25, seed=4)["choices"][0]["text"] == choice["text"]


def test_echo_max_tokens_0_and_logprobs_score_the_prompt_as_score_does(client: TestClient) -> None:
    prompt = "The engineer and the sailor walked along the shore."
    choice = complete(client, prompt=prompt, max_tokens=0, echo=True, logprobs=5)["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == prompt and lp["tokens"] == list(prompt) and lp["text_offset"] == list(range(len(prompt)))
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts the first
    assert all(5 <= len(top) <= 6 for top in lp["top_logprobs"][1:])
    scored = client.post("/score", json={"text": prompt, "top_k": 5}).json()
    assert abs(sum(lp["token_logprobs"][1:]) - scored["logprob"]) < 1e-4
    assert [c["logprob"] for c in scored["per_char"]] == lp["token_logprobs"]
    single = complete(client, prompt="T", max_tokens=0, echo=True, logprobs=2)["choices"][0]["logprobs"]
    assert single == {"tokens": ["T"], "token_logprobs": [None], "top_logprobs": [None], "text_offset": [0]}
    both = complete(client, prompt=prompt, max_tokens=10, echo=True, logprobs=1, seed=2)["choices"][0]
    assert both["logprobs"]["token_logprobs"][: len(prompt)] == lp["token_logprobs"]
    assert len(both["logprobs"]["tokens"]) == len(prompt) + 10
    assert both["logprobs"]["text_offset"] == list(range(len(prompt) + 10))


def parse_stream(text: str) -> list[Any]:
    events = [block.removeprefix("data: ") for block in text.strip().split("\n\n")]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def stream(client: TestClient, **body: Any) -> list[dict[str, Any]]:
    with client.stream("POST", "/v1/completions", json={"model": MODEL, "stream": True, **body}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return parse_stream(r.read().decode())


def test_stream(client: TestClient) -> None:
    request = {"prompt": ["The ", "wood"], "n": 2, "max_tokens": 60, "seed": 6, "logprobs": 1, "echo": True}
    chunks = stream(client, **request)
    whole = complete(client, **request)
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and all(c["object"] == "text_completion" for c in chunks)
    assert all("usage" not in c for c in chunks)
    for expected in whole["choices"]:
        mine = [ch for c in chunks for ch in c["choices"] if ch["index"] == expected["index"]]
        assert "".join(ch["text"] for ch in mine) == expected["text"]
        assert [ch["finish_reason"] for ch in mine] == [None] * (len(mine) - 1) + ["length"]
        pieces = [ch["logprobs"] for ch in mine if ch["logprobs"]]
        for key in ("tokens", "token_logprobs", "text_offset"):
            assert [x for p in pieces for x in p[key]] == expected["logprobs"][key]


def test_stream_with_usage_and_stop(client: TestClient) -> None:
    base = complete(client, prompt="The ", max_tokens=200, seed=3)["choices"][0]["text"]
    stop = base[50:53]
    chunks = stream(client, prompt="The ", max_tokens=200, seed=3, stop=stop, stream_options={"include_usage": True})
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["choices"] == []
    text = "".join(ch["text"] for c in chunks for ch in c["choices"])
    assert text == base[: base.index(stop)] and chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": len(text), "total_tokens": 4 + len(text)}


def test_a_timed_out_request_ends_with_length_and_the_partial_text(tiny_checkpoint_path: Path) -> None:
    settings = settings_for(tiny_checkpoint_path, max_length=10**9, request_timeout=0.05)
    with TestClient(create_app(settings)) as c:
        choice = c.post("/v1/completions", json={"model": MODEL, "prompt": "The ", "max_tokens": 10**9}).json()
        [choice] = choice["choices"]
        assert choice["finish_reason"] == "length" and len(choice["text"]) < 10**9


UNSUPPORTED = [
    ({"suffix": "and so on"}, "suffix"),
    ({"n": 3, "best_of": 2}, "best_of"),
    ({"best_of": 3, "stream": True}, "best_of"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
]


@pytest.mark.parametrize("extra, param", UNSUPPORTED)
def test_unsupported_parameters_are_refused_by_name(client: TestClient, extra: dict, param: str) -> None:
    message = assert_openai_error(client.post("/v1/completions", json={"model": MODEL, "prompt": "The", **extra}),
                                  400, param)
    assert param in message


def test_neutral_values_of_unsupported_parameters_are_accepted(client: TestClient) -> None:
    body = complete(client, prompt="The", max_tokens=5, suffix="", best_of=1, logit_bias={}, presence_penalty=0,
                    frequency_penalty=0.0, user="someone", seed=1)
    assert len(body["choices"][0]["text"]) == 5


@pytest.mark.parametrize(
    "body, param",
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 801}, "max_tokens"),
        ({"max_tokens": 10**30}, "max_tokens"),
        ({"max_tokens": 5.0}, "max_tokens"),
        ({"logprobs": 6}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),  # more choices than this server's max_choices (max_batch 16)
        ({"prompt": ["The", "wood"], "n": 9}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"stop": "x" * 65}, "stop"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**53}, "seed"),
        ({"echo": "yes"}, "echo"),
        ({"stream": 1}, "stream"),
        ({"prompt": "The €"}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["The", 5]}, "prompt"),
        ({"prompt": "T" * 10_001}, "prompt"),
        ({"model": 5}, "model"),
        ({"unknown": 1}, "unknown"),
        ({"stream_options": {"include_usage": True, "other": 1}, "stream": True}, "stream_options"),
    ],
)
def test_invalid_requests_are_400_naming_the_parameter(client: TestClient, body: dict, param: str) -> None:
    request = {"model": MODEL, "prompt": "The", **body}
    message = assert_openai_error(client.post("/v1/completions", json=request), 400, param)
    assert param in message and len(message) < 1000


def test_errors_name_the_cause_without_echoing_the_input(client: TestClient) -> None:
    missing = assert_openai_error(client.post("/v1/completions", json={"prompt": "The"}), 400, "model")
    assert "model" in missing
    unknown = assert_openai_error(client.post("/v1/completions", json={"model": MODEL, "unknown": 1, "prompt": "T"}),
                                  400, "unknown")
    assert unknown == "Unrecognized request argument supplied: unknown"
    many = "".join(chr(0x4E00 + i) for i in range(3000))
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "The " + many})
    assert "and 2980 more" in assert_openai_error(r, 400, "prompt") and len(r.content) < 2000
    limit = assert_openai_error(client.post("/v1/completions", json={"model": MODEL, "prompt": "T", "max_tokens": 801}),
                                400, "max_tokens")
    assert "800" in limit
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_openai_error(r, 400, None)
    wrong = assert_openai_error(client.post("/v1/completions", json={"model": "gpt-3.5-turbo-instruct", "prompt": "T"}),
                                404, "model", "model_not_found")
    assert MODEL in wrong  # says what is served


def test_other_errors_in_openais_shape(client: TestClient) -> None:
    assert_openai_error(client.get("/v1/nope"), 404)
    assert_openai_error(client.get("/v1/completions"), 405)
    r = client.post("/v1/completions", content=b'{"prompt": "' + b"a" * 70_000 + b'"}',
                    headers={"content-type": "application/json"})
    assert_openai_error(r, 413, code="request_too_large")
    assert client.post("/generate", json={"seed": "The", "length": 0}).json()["error"]["type"] == "validation_error"


def test_api_key_as_bearer_and_401_in_openais_shape(tiny_checkpoint_path: Path) -> None:
    with TestClient(create_app(settings_for(tiny_checkpoint_path, api_key="s3cret"))) as c:
        request = {"model": MODEL, "prompt": "The", "max_tokens": 3}
        assert_openai_error(c.post("/v1/completions", json=request), 401, code="invalid_api_key")
        assert_openai_error(c.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
        assert_openai_error(c.post("/v1/completions", json={"bad": 1}), 401)  # before the body is judged
        ok = {"Authorization": "Bearer s3cret"}
        assert c.post("/v1/completions", json=request, headers=ok).status_code == 200
        assert c.get("/v1/models", headers=ok).status_code == 200


def test_not_ready_and_queue_full_in_openais_shape(tiny_checkpoint_path: Path) -> None:
    app = create_app(settings_for(tiny_checkpoint_path, max_batch=1, max_queue=1, max_length=ENDLESS))
    with TestClient(app) as c:
        engine = default_engine(app)
        running = hold_the_row(engine)
        waiting = engine.submit(GenerationRequest("The ", length=5))
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "The", "max_tokens": 5})
        assert_openai_error(r, 429, code="queue_full")
        assert r.headers["retry-after"] == "1"
        waiting.cancel()
        running.cancel()
        app.state.draining = True
        assert_openai_error(c.post("/v1/completions", json={"model": MODEL, "prompt": "The"}), 503, code="not_ready")


def test_every_new_route_is_on_the_api_page_with_examples(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    paths, schemas = doc["paths"], doc["components"]["schemas"]
    for path, method in (("/v1/completions", "post"), ("/v1/models", "get"), ("/v1/models/{model_id}", "get"),
                         ("/score", "post")):
        operation = paths[path][method]
        assert operation["summary"] and "200" in operation["responses"], path
    completions = paths["/v1/completions"]["post"]["responses"]
    assert "422" not in completions and completions["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/OpenAIErrorResponse")
    assert "data: [DONE]" in completions["200"]["content"]["text/event-stream"]["example"]
    for name in ("CompletionRequest", "Completion", "ModelList", "Model", "OpenAIErrorResponse", "ScoreRequest",
                 "ScoreResponse"):
        assert schemas[name].get("examples"), name
    examples = schemas["CompletionRequest"]["examples"]
    assert any(e.get("temperature") == 0 for e in examples) and any(e.get("echo") for e in examples)


def test_requests_are_counted_by_route(client: TestClient) -> None:
    complete(client, prompt="The", max_tokens=3)
    text = client.get("/metrics").text
    assert 'charlm_http_requests_total{route="/v1/completions",status="200"}' in text


def test_a_failure_mid_stream_is_an_error_event_and_the_end(tiny_checkpoint_path: Path) -> None:
    settings = settings_for(tiny_checkpoint_path, max_length=800, max_batch=16)
    with TestClient(create_app(settings, engine_hooks=EngineHooks(on_char=explode_seed_99))) as client:
        request = {"model": MODEL, "prompt": "The ", "max_tokens": 100, "seed": 99, "stream": True}
        with client.stream("POST", "/v1/completions", json=request) as r:
            events = [block.removeprefix("data: ") for block in r.read().decode().strip().split("\n\n")]
        last = json.loads(events[-1])
        assert set(last) == {"error"} and "row exploded" in last["error"]["message"]
        assert last["error"]["type"] == "server_error" and "[DONE]" not in events
        r = client.post("/v1/completions", json={**request, "stream": False})
        assert_openai_error(r, 500)
        assert "row exploded" in r.json()["error"]["message"]
        # The fault hits only random_seed 99: every other request is served as before.
        assert complete(client, prompt="The ", max_tokens=10)["choices"][0]["finish_reason"] == "length"


def test_best_of_returns_the_n_most_likely_of_its_candidates(client: TestClient) -> None:
    common = {"prompt": "The ", "max_tokens": 40, "seed": 11, "temperature": 1.5}
    candidates = complete(client, n=5, logprobs=0, **common)["choices"]  # the same five, seeds and all
    likelihood = {c["text"]: sum(c["logprobs"]["token_logprobs"]) for c in candidates}
    ranked = sorted(likelihood, key=lambda text: -likelihood[text])
    body = complete(client, n=2, best_of=5, **common)
    assert [c["text"] for c in body["choices"]] == ranked[:2]
    assert [c["index"] for c in body["choices"]] == [0, 1] and body["choices"][0]["logprobs"] is None
    with_logprobs = complete(client, n=2, best_of=5, logprobs=1, **common)["choices"]
    assert [c["text"] for c in with_logprobs] == ranked[:2] and with_logprobs[0]["logprobs"]["top_logprobs"]
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "The", "n": 1, "best_of": 10**6})
    assert r.status_code in (400, 422) and "best_of" in r.text
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": ["The"] * 10, "best_of": 100})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of" and "queue places" in r.text
