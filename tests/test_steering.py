"""Steering in the engine: logit_bias, presence/frequency/repetition penalties and min_p, on both decode
paths, reproducible per seed and independent of the batch; the order they apply in."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from charlm.checkpoint import Checkpoint
from charlm.engine import Engine
from charlm.request import EngineLimits, GenerationRequest, RequestError
from charlm.sampling import InvalidParameter, SamplingParams
from charlm.steering import Steering
from tests.server import running_server

LIMITS = EngineLimits(max_batch=16, max_length=2000)


def request(seed: str = "The ", length: int = 300, random_seed: int = 1, **sampling: object) -> GenerationRequest:
    return GenerationRequest(seed, length=length, sampling=SamplingParams(**sampling), random_seed=random_seed)  # type: ignore[arg-type]


@pytest.mark.parametrize("native", [True, False], ids=["native kernels", "pytorch"])
def test_a_banned_character_never_appears_and_steered_rows_are_batch_independent(tiny: Checkpoint,
                                                                               native: bool) -> None:
    e_id, space = tiny.vocab.chars.index("e"), tiny.vocab.chars.index(" ")
    banned = request(length=2000, logit_bias=((e_id, -100.0), (space, -100.0)), scale_factor=0.8)
    with Engine(tiny.model, tiny.vocab, LIMITS, use_native=native) as engine:
        alone = engine.generate(banned, timeout=120).generated
        crowd = engine.submit_many([request(random_seed=i) for i in range(5)] + [banned]
                                   + [request(random_seed=i, presence_penalty=1.5) for i in range(5)])
        among = crowd[5].result(timeout=120).generated
        plain = engine.generate(request(length=2000, scale_factor=0.8), timeout=120).generated
    assert len(alone) == 2000 and "e" not in alone and " " not in alone
    assert among == alone
    assert plain.count("e") > 50  # the model writes e's when it may


def test_a_positive_bias_decides_a_greedy_pick_and_penalties_change_the_counts(tiny: Checkpoint) -> None:
    x_id = tiny.vocab.chars.index("k")
    with Engine(tiny.model, tiny.vocab, LIMITS) as engine:
        forced = engine.generate(request(length=50, greedy=True, logit_bias=((x_id, 100.0),))).generated
        plain = Counter(engine.generate(request(length=2000, random_seed=3)).generated)
        penalized = Counter(engine.generate(request(length=2000, random_seed=3, frequency_penalty=0.05)).generated)
    assert forced == "k" * 50
    top = [c for c, _ in plain.most_common(2)]  # the space and `e`, on English text
    assert all(penalized[c] < plain[c] for c in top), (plain.most_common(3), penalized.most_common(3))


def test_min_p_keeps_only_characters_near_the_top(tiny: Checkpoint) -> None:
    with Engine(tiny.model, tiny.vocab, LIMITS) as engine:
        greedy = engine.generate(request(length=200, greedy=True)).generated
        near_top = engine.generate(request(length=200, min_p=1.0, scale_factor=0.5)).generated
    assert near_top == greedy  # min_p 1 keeps only the most likely character (ties aside): greedy


def test_the_order_bias_repetition_presence_frequency() -> None:
    params = SamplingParams(logit_bias=((0, 2.0),), repetition_penalty=2.0, presence_penalty=0.5,
                            frequency_penalty=0.25)
    steering = Steering(params, 4, torch.tensor([1]))
    steering.update(0)
    steering.update(0)
    z = torch.tensor([1.0, 3.0, -1.0, 1.0])
    steering.apply(z)
    # id 0: (1 + 2) / 2 (seen: generated) - 0.25 * 2 - 0.5; id 1: 3 / 2 (seen: in the seed), no count;
    # id 2, 3: unseen, unchanged
    assert z.tolist() == [0.5, 1.5, -1.0, 1.0]


def test_bad_settings_are_refused_naming_the_field(tiny: Checkpoint) -> None:
    for field, value in (("presence_penalty", 2.5), ("frequency_penalty", float("nan")), ("min_p", -0.1),
                         ("repetition_penalty", 0.0), ("logit_bias", ((1, 1e308),)),
                         ("logit_bias", ((1, float("nan")),))):
        with pytest.raises(InvalidParameter) as info:
            SamplingParams(**{field: value})  # type: ignore[arg-type]
        assert info.value.field == field
    size = len(tiny.vocab)
    with Engine(tiny.model, tiny.vocab, LIMITS) as engine:
        for bias, message in ((((size, 1.0),), f"vocabulary ids run from 0 to {size - 1}"),
                              (tuple((i % size, 1.0) for i in range(size + 1)), f"at most {size} entries"),
                              (((1, 1.0), (1, 2.0)), "more than once")):
            with pytest.raises(RequestError, match=message):
                engine.submit(request(logit_bias=bias))


def test_the_native_routes_take_characters_as_bias_keys(tiny_checkpoint_path: Path) -> None:
    body = {"seed": "The ", "length": 400, "random_seed": 2, "logit_bias": {"e": -100, " ": -100},
            "presence_penalty": 0.5, "frequency_penalty": 0.1, "repetition_penalty": 1.2, "min_p": 0.05}
    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint_path, device="cpu"))) as c:
        first = c.post("/generate", json=body).json()["text"]
        assert c.post("/generate", json=body).json()["text"] == first
        assert "e" not in first[4:] and " " not in first[4:]
        streamed = c.post("/generate/stream", json=body).text
        assert '"done"' in streamed or "event: done" in streamed
        for extra, field in (({"logit_bias": {"ab": 1}}, "logit_bias"), ({"logit_bias": {"☃": 1}}, "logit_bias"),
                             ({"logit_bias": {"e": 1e308}}, "logit_bias"), ({"logit_bias": {"e": "x"}}, "logit_bias.e"),
                             ({"presence_penalty": 2.5}, "presence_penalty"), ({"min_p": 1.5}, "min_p"),
                             ({"repetition_penalty": 0}, "repetition_penalty")):
            r = c.post("/generate", json={**body, **extra})
            assert r.status_code == 422, (extra, r.text)
            assert r.json()["error"]["details"][0]["field"] == field, (extra, r.text)
        r = c.post("/generate", content='{"seed": "The ", "logit_bias": {"e": NaN}}',
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "logit_bias", r.text


def test_the_openai_sdk_sends_every_steering_parameter(tiny_checkpoint_path: Path, tiny: Checkpoint) -> None:
    import openai

    e_id = str(tiny.vocab.chars.index("e"))
    with running_server(tiny_checkpoint_path) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        steered = dict(model=model, prompt="The ", max_tokens=2000, n=5, seed=4, logit_bias={e_id: -100},
                       presence_penalty=0.3, frequency_penalty=0.2,
                       extra_body={"repetition_penalty": 1.1, "min_p": 0.02})
        texts = [choice.text for choice in client.completions.create(**steered).choices]  # type: ignore[call-overload]
        assert sum(map(len, texts)) == 10_000 and not any("e" in text for text in texts)
        again = client.completions.create(**steered)  # type: ignore[call-overload]
        assert [choice.text for choice in again.choices] == texts
        best = client.completions.create(model=model, prompt="The ", max_tokens=30, n=2, best_of=6, seed=1, logprobs=0)
        sums = [sum(choice.logprobs.token_logprobs) for choice in best.choices]  # type: ignore[union-attr, arg-type]
        assert len(best.choices) == 2 and sums[0] >= sums[1]  # the likelier first
        for kwargs, param in (({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {"99999": 1}}, "logit_bias"),
                              ({"logit_bias": {e_id: 1e308}}, "logit_bias"),
                              ({"presence_penalty": 3}, "presence_penalty"),
                              ({"extra_body": {"min_p": 2}}, "min_p")):
            with pytest.raises(openai.BadRequestError) as info:
                client.completions.create(model=model, prompt="The ", max_tokens=5, **kwargs)
            assert param in str(info.value), (kwargs, info.value)
        raw = f'{{"model": "{model}", "prompt": "The ", "logit_bias": {{"{e_id}": NaN}}}}'  # what json.dumps writes
        r = httpx.post(f"{server.url}/v1/completions", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text
