"""The engine and the service on a CUDA device, where one is present (skipped elsewhere): the same
contracts as on the CPU, on the path a GPU takes (PyTorch alone, no native kernels)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from charlm.checkpoint import Checkpoint, load_checkpoint
from charlm.constraint import Constraint, compile_constraint
from charlm.engine import Engine
from charlm.evaluate import evaluate
from charlm.request import EngineLimits, GenerationRequest, ScoreRequest
from charlm.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

TEXT = "The engineer and the sailor walked along the shore of the island."


@pytest.fixture(scope="module")
def on_gpu(tiny_checkpoint_path: Path) -> Checkpoint:
    return load_checkpoint(tiny_checkpoint_path, torch.device("cuda"))


def test_generation_is_reproducible_and_batch_independent_on_cuda(on_gpu: Checkpoint) -> None:
    request = GenerationRequest("The ", length=120, sampling=SamplingParams(scale_factor=1.5, top_k=10),
                                random_seed=7, logprobs=3)
    with Engine(on_gpu.model, on_gpu.vocab, EngineLimits(max_batch=16)) as engine:
        assert engine.device.type == "cuda" and not engine.native
        alone = engine.generate(request, timeout=120)
        crowd = engine.submit_many([request, *(GenerationRequest("The sea", length=120, random_seed=s)
                                               for s in range(8))])
        among = crowd[0].result(timeout=120)
    assert among.generated == alone.generated and len(alone.generated) == 120
    assert alone.logprobs is not None and len(alone.logprobs) == 120
    for entry in alone.logprobs:
        assert entry.logprob is not None and entry.logprob <= 0 and len(entry.top) == 3
        assert [v for _, v in entry.top] == sorted((v for _, v in entry.top), reverse=True)


def test_steering_and_constraints_on_cuda(on_gpu: Checkpoint) -> None:
    """Bias, penalties and a regex mask act on the GPU's logits, and a choice is scored there, as on the
    CPU: no "e" where it is banned, and every text matches."""
    letters = compile_constraint(Constraint.of("regex", "[a-z]{3} [a-z]{4}"), on_gpu.vocab.chars)
    names = compile_constraint(Constraint.of("choice", ["the shore", "the boy", "wood"]), on_gpu.vocab.chars)
    steered = SamplingParams(logit_bias=((on_gpu.vocab.chars.index("e"), -100.0),), frequency_penalty=0.1,
                             presence_penalty=0.1, repetition_penalty=1.1)
    with Engine(on_gpu.model, on_gpu.vocab, EngineLimits(max_batch=16)) as engine:
        gens = engine.submit_many([GenerationRequest("Along ", length=30, random_seed=s, constraint=c, sampling=p)
                                   for s in range(8) for c in (letters, names) for p in (SamplingParams(), steered)])
        texts = [g.result(timeout=120).generated for g in gens]
    assert all(re.fullmatch("[a-z]{3} [a-z]{4}", t) for t in texts[0::4] + texts[1::4])
    assert set(texts[2::4] + texts[3::4]) <= {"the shore", "the boy", "wood"}
    assert not any("e" in t for t in texts[1::4] + texts[3::4])


def test_scoring_on_cuda_agrees_with_evaluate(on_gpu: Checkpoint) -> None:
    with Engine(on_gpu.model, on_gpu.vocab) as engine:
        scored = engine.score(ScoreRequest(TEXT, top_k=2)).result(timeout=120)
    expected = evaluate(on_gpu.model, on_gpu.vocab.encode(TEXT).to("cuda"))
    assert math.isclose(scored.bits_per_char, expected["bpc"], abs_tol=1e-4)


def test_the_service_on_cuda(tiny_checkpoint_path: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    settings = Settings(checkpoint=tiny_checkpoint_path, device="cuda")
    with TestClient(create_app(settings)) as client:
        assert client.get("/info").json()["device"].startswith("cuda")
        body = {"seed": "The ", "length": 80, "random_seed": 3}
        first, second = (client.post("/generate", json=body).json()["text"] for _ in range(2))
        assert first == second and len(first) == 84
        request = {"model": "tiny", "prompt": TEXT, "echo": True, "logprobs": 2, "n": 3, "max_tokens": 20, "seed": 1}
        choices = client.post("/v1/completions", json=request).json()["choices"]
        scored = client.post("/score", json={"text": TEXT, "top_k": 2}).json()["per_char"]
        for choice in choices:
            assert choice["logprobs"]["token_logprobs"][: len(TEXT)] == [e["logprob"] for e in scored]
        with client.stream("POST", "/v1/completions", json={**request, "stream": True}) as r:
            assert r.status_code == 200 and "[DONE]" in r.read().decode()


def test_training_steps_on_cuda(corpus_path: Path, tmp_path: Path) -> None:
    from charlm.train import train
    from tests.conftest import tiny_config

    out = tmp_path / "m.safetensors"
    result = train(tiny_config(corpus_path, out, device="cuda", steps=60, eval_interval=30))
    assert math.isfinite(result.best_val_bpc)
    assert load_checkpoint(out, torch.device("cuda")).model.fc.weight.device.type == "cuda"
