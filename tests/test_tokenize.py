"""POST /tokenize and /detokenize: vLLM's shapes, one token per vocabulary character."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from charlm.checkpoint import Checkpoint


@pytest.fixture(scope="module")
def client(tiny_checkpoint_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint_path, device="cpu"))) as c:
        yield c


def test_a_text_round_trips_through_its_tokens(client: TestClient, tiny: Checkpoint) -> None:
    text = "The sea and the island"
    r = client.post("/tokenize", json={"prompt": text, "return_token_strs": True})
    assert r.status_code == 200 and r.headers["X-Charlm-Model-Version"]
    body = r.json()
    assert body["count"] == len(text) == len(body["tokens"])
    assert body["tokens"] == tiny.vocab.encode(text).tolist() and "".join(body["token_strs"]) == text
    assert body["max_model_len"] == Settings().max_seed_chars
    assert client.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": text}
    plain = client.post("/tokenize", json={"prompt": "", "add_special_tokens": False}).json()
    assert plain == {"count": 0, "max_model_len": body["max_model_len"], "tokens": [], "token_strs": None}


def test_what_is_not_in_the_vocabulary_is_named(client: TestClient, tiny: Checkpoint) -> None:
    r = client.post("/tokenize", json={"prompt": "The ☃ and ✈"})
    assert r.status_code == 422
    detail = r.json()["error"]["details"][0]
    assert detail["field"] == "prompt" and detail["unknown_characters"] == ["☃", "✈"]
    size = len(tiny.vocab)
    r = client.post("/detokenize", json={"tokens": [1, 2, size]})
    assert r.status_code == 422 and f"ids run from 0 to {size - 1}" in r.json()["error"]["message"]
    assert r.json()["error"]["details"][0]["field"] == "tokens.2"
    for tokens in ([-1], [True], ["3"], [1.5]):
        assert client.post("/detokenize", json={"tokens": tokens}).status_code == 422, tokens
    assert client.post("/tokenize", json={"prompt": "a", "model": "nope"}).status_code == 404
    assert client.post("/tokenize", json={"prompt": "a", "messages": []}).status_code == 422
