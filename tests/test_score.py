"""POST /score through the service: the trainer's numbers, the per-character view, limits and errors."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from charlm.checkpoint import Checkpoint
from charlm.cli import main
from charlm.evaluate import evaluate
from charlm.text import load_corpus, split_text
from tests.conftest import default_engine, make_corpus
from tests.test_service import assert_error, settings_for


@pytest.fixture(scope="module")
def client(tiny_checkpoint_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tiny_checkpoint_path, max_score_chars=6000))) as c:
        yield c


def test_score_agrees_with_charlm_eval(client: TestClient, tiny_checkpoint_path: Path, corpus_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--checkpoint", str(tiny_checkpoint_path), "--corpus", str(corpus_path),
                 "--device", "cpu"]) == 0
    cli = json.loads(capsys.readouterr().out)
    held_out = split_text(load_corpus(corpus_path), 0.1)[1]  # the text `charlm eval` scored
    assert len(held_out) > 1024  # several of the engine's chunks
    r = client.post("/score", json={"text": held_out, "per_char": False})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["chars"] == cli["chars"] == len(held_out) - 1
    assert abs(body["bits_per_char"] - cli["bpc"]) < 1e-4
    assert body["per_char"] is None and body["logprob"] == pytest.approx(-body["bits_per_char"] * body["chars"]
                                                                         * math.log(2))


def test_per_character_log_probabilities(client: TestClient, tiny: Checkpoint) -> None:
    text = "The engineer and the sailor walked."
    body = client.post("/score", json={"text": text, "top_k": 3}).json()
    chars = body["per_char"]
    assert "".join(c["char"] for c in chars) == text
    assert chars[0] == {"char": "T", "logprob": None, "top": []}  # nothing precedes it to predict it
    assert body["logprob"] == pytest.approx(sum(c["logprob"] for c in chars[1:]))
    expected = evaluate(tiny.model, tiny.vocab.encode(text))
    assert body["bits_per_char"] == pytest.approx(expected["bpc"], abs=1e-5)
    for c in chars[1:]:
        top = [t["logprob"] for t in c["top"]]
        assert len(top) == 3 and top == sorted(top, reverse=True) and c["logprob"] <= top[0] + 1e-12
    assert all(c["top"] == [] for c in client.post("/score", json={"text": text}).json()["per_char"])


@pytest.mark.parametrize(
    "body, field",
    [
        ({"text": "T"}, "text"),
        ({"text": ""}, "text"),
        ({"text": "The", "top_k": 6}, "top_k"),
        ({"text": "The", "top_k": -1}, "top_k"),
        ({"text": "The", "top_k": True}, "top_k"),
        ({"text": "The", "top_k": 2.0}, "top_k"),
        ({"text": "The", "per_char": "yes"}, "per_char"),
        ({"text": "The", "extra": 1}, "extra"),
        ({"top_k": 1}, "text"),
        ({"text": 5}, "text"),
    ],
)
def test_validation_names_the_field(client: TestClient, body: dict, field: str) -> None:
    err = assert_error(client.post("/score", json=body), 422, "validation_error")
    assert field in [d["field"] for d in err["details"]], err


def test_unknown_characters_are_named_but_capped(client: TestClient) -> None:
    many = "".join(chr(0x4E00 + i) for i in range(5000))
    r = client.post("/score", json={"text": "The " + many})
    detail = assert_error(r, 422, "validation_error")["details"][0]
    assert detail["field"] == "text" and len(detail["unknown_characters"]) == 20
    assert detail["unknown_count"] == 5000 and len(r.content) < 2000


def test_the_length_limit_is_named_and_on_info(client: TestClient) -> None:
    err = assert_error(client.post("/score", json={"text": "The " * 1600}), 422, "validation_error")
    assert "6000" in err["details"][0]["message"] and err["details"][0]["field"] == "text"
    limits = client.get("/info").json()["limits"]
    assert limits["max_score_chars"] == 6000 and limits["max_logprobs"] == 5
    assert limits["max_choices"] == min(limits["max_batch"], limits["max_queue"])


def test_score_needs_the_api_key_when_one_is_set(tiny_checkpoint_path: Path) -> None:
    with TestClient(create_app(settings_for(tiny_checkpoint_path, api_key="s3cret"))) as c:
        assert_error(c.post("/score", json={"text": "The"}), 401, "unauthorized")
        assert_error(c.post("/score", json={"text": 5}), 401, "unauthorized")  # before the body is judged
        ok = c.post("/score", json={"text": "The"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["chars"] == 2


def test_a_long_score_shares_the_engine_with_generation(client: TestClient) -> None:
    text = make_corpus(200, seed=3)[:5000]
    engine = default_engine(client.app)
    from charlm.request import GenerationRequest, ScoreRequest

    scoring = engine.score(ScoreRequest(text))
    short = engine.submit(GenerationRequest("The ", length=5, random_seed=1))
    assert short.result(timeout=60).finish_reason == "length"
    assert scoring.result(timeout=60).chars == len(text) - 1
    assert short.first_char_at is not None and scoring.finished_at is not None
    assert short.first_char_at < scoring.finished_at  # not after the whole text
    r = client.post("/score", json={"text": text, "per_char": False})
    assert r.json()["bits_per_char"] == pytest.approx(scoring.result().bits_per_char)


def test_score_on_the_api_page(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    operation = doc["paths"]["/score"]["post"]
    assert operation["summary"] and "422" in operation["responses"]
    schemas = doc["components"]["schemas"]
    assert schemas["ScoreRequest"]["examples"][0]["text"] and schemas["ScoreResponse"]["examples"][0]["per_char"]
    assert schemas["ScoreRequest"]["properties"]["top_k"]["maximum"] == 5
