"""Decode weights in fp32, bf16 and int8: each format's text is reproducible and independent of the
batch and of the kernels' code path; a format is chosen per server, per command or per checkpoint
(`charlm quantize`); weights a format cannot hold are refused, naming the layer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from charlm import native
from charlm.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from charlm.engine import Engine
from charlm.evaluate import evaluate, evaluate_decoded
from charlm.model import CharLSTM
from charlm.prefix_cache import PrefixCache
from charlm.request import EngineLimits, GenerationRequest
from charlm.sampling import SamplingParams
from tests.conftest import make_corpus
from tests.test_cli import run

LIMITS = EngineLimits(max_batch=8)
SEEDS = ["The engineer ", "Neb and the sailor", "T"]


def requests() -> list[GenerationRequest]:
    return [GenerationRequest(seed, length=150, sampling=SamplingParams(scale_factor=1.5), random_seed=i)
            for i, seed in enumerate(SEEDS * 2)]


def alone_and_together(tiny: Checkpoint, weights: native.WeightFormat) -> tuple[list[str], list[str]]:
    with Engine(tiny.model, tiny.vocab, LIMITS, weights=weights) as engine:
        assert engine.weights == weights and engine.native
        alone = [engine.generate(r, timeout=60).text for r in requests()]
        together = [g.result(timeout=60).text for g in engine.submit_many(requests())]
    return alone, together


@pytest.mark.parametrize("weights", native.WEIGHT_FORMATS)
def test_each_format_gives_the_same_text_alone_and_in_a_batch(tiny: Checkpoint,
                                                             weights: native.WeightFormat) -> None:
    alone, together = alone_and_together(tiny, weights)
    assert alone == together
    _, again = alone_and_together(tiny, weights)
    assert again == together  # and per random seed, run after run


def test_every_code_path_gives_each_format_the_same_text(tiny: Checkpoint) -> None:
    kernels = native.load()
    assert kernels is not None
    paths = [isa for isa in kernels.available() if isa != "portable"]  # portable: compared in test_native
    by_path = {}
    try:
        for isa in paths:
            kernels.use(isa)
            by_path[isa] = {w: alone_and_together(tiny, w)[1] for w in ("fp32", "int8")}
    finally:
        kernels.use("auto")
    assert all(texts == by_path[paths[0]] for texts in by_path.values())
    assert by_path[paths[0]]["int8"] != by_path[paths[0]]["fp32"]  # the format is really applied


def test_other_formats_need_the_native_kernels(tiny: Checkpoint) -> None:
    with pytest.raises(native.WeightsError, match="int8 decode weights need the native kernels"):
        Engine(tiny.model, tiny.vocab, LIMITS, use_native=False, weights="int8")


def test_a_cache_shared_by_two_formats_keeps_each_formats_text(tiny: Checkpoint) -> None:
    seed = ("The settlers walked along the shore of the island. " * 20)[:900]
    cache = PrefixCache(2**20)
    for weights in ("int8", "fp32", "int8"):
        with Engine(tiny.model, tiny.vocab, LIMITS, weights=weights, cache=cache, version="v") as cached, \
                Engine(tiny.model, tiny.vocab, LIMITS, weights=weights) as plain:
            request = GenerationRequest(seed, length=100, random_seed=5)
            assert cached.generate(request, timeout=60).text == plain.generate(request, timeout=60).text
    assert cache.stats.hits >= 1


def huge(tiny: Checkpoint, path: Path) -> Path:
    """A copy of the tiny model with one weight that dwarfs its row (it loads: it is finite)."""
    model = CharLSTM(tiny.config)
    model.load_state_dict(tiny.model.state_dict())
    with torch.no_grad():
        model.state_dict()["lstm.weight_hh_l0"][7, 3] = 1e30  # the parameter's storage
    save_checkpoint(path, model, tiny.vocab, tiny.train)
    return path


def test_int8_refuses_a_checkpoint_with_huge_weights(tiny: Checkpoint, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = huge(tiny, tmp_path / "huge.safetensors")
    code, _, err = run(["generate", "--checkpoint", str(path), "--seed", "The ", "--weights", "int8",
                        "--device", "cpu"], capsys)
    assert code == 1
    assert "charlm generate: error: LSTM layer 0 row 7: int8 rounding would zero" in err
    assert "decode this model in bf16 or fp32" in err and "Traceback" not in err
    code, out, _ = run(["generate", "--checkpoint", str(path), "--seed", "The ", "--weights", "bf16",
                        "--length", "20", "--device", "cpu"], capsys)
    assert code == 0 and out.startswith("The ")
    code, _, err = run(["quantize", "--checkpoint", str(path), "--weights", "int8", "--out",
                        str(tmp_path / "q.safetensors")], capsys)
    assert code == 1 and "int8 rounding would zero" in err and not (tmp_path / "q.safetensors").exists()


def test_a_checkpoint_holding_nan_is_refused_before_any_format(tiny: Checkpoint, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    model = CharLSTM(tiny.config)
    model.load_state_dict(tiny.model.state_dict())
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    save_checkpoint(tmp_path / "nan.safetensors", model, tiny.vocab, tiny.train)
    code, _, err = run(["generate", "--checkpoint", str(tmp_path / "nan.safetensors"), "--seed", "The ",
                        "--weights", "int8", "--device", "cpu"], capsys)
    assert code == 1 and "'fc.weight' holds NaN or Inf values" in err


def test_quantize_writes_a_copy_that_is_served_in_its_format(tiny_checkpoint_path: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "models" / "small.safetensors"
    out.parent.mkdir()
    code, printed, _ = run(["quantize", "--checkpoint", str(tiny_checkpoint_path), "--weights", "int8",
                            "--out", str(out)], capsys)
    report = json.loads(printed)
    assert code == 0 and report["weights"] == "int8"
    assert report["decode_weight_bytes"] < report["fp32_decode_weight_bytes"] / 2
    assert load_checkpoint(out).weights == "int8" and load_checkpoint(tiny_checkpoint_path).weights == "fp32"
    code, _, err = run(["quantize", "--checkpoint", str(out), "--weights", "bf16", "--out", str(out)], capsys)
    assert code == 2 and "--out: it is the input checkpoint" in err
    body = {"seed": "The ", "length": 80, "random_seed": 4}
    with TestClient(create_app(Settings(models=str(out.parent), device="cpu"))) as c:
        from_file = c.post("/generate", json=body).json()["text"]
        info = c.get("/info").json()
        assert info["model"]["weights"] == "int8" and info["kernels"] in native.ISAS
    with TestClient(create_app(Settings(models=str(out.parent), device="cpu", weights="fp32"))) as c:
        overridden = c.post("/generate", json=body).json()["text"]
    tiny = load_checkpoint(tiny_checkpoint_path)
    formats: list[tuple[native.WeightFormat, str]] = [("int8", from_file), ("fp32", overridden)]
    for weights, text in formats:
        with Engine(tiny.model, tiny.vocab, LIMITS, weights=weights) as engine:
            assert engine.generate(GenerationRequest("The ", length=80, random_seed=4)).text == text


def test_a_kernel_path_the_cpu_lacks_fails_the_start_naming_it(tiny_checkpoint_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(native.Kernels, "cpu_features", property(lambda self: {"avx2", "fma"}))  # an AVX2 CPU
    with pytest.raises(ValueError, match="avx512 kernels need avx512f, avx512bw, avx512_vnni"):
        Settings(kernels="avx512")
    assert Settings(kernels="avx2").kernels == "avx2"
    code, _, err = run(["generate", "--checkpoint", str(tiny_checkpoint_path), "--seed", "T", "--kernels",
                        "avx512", "--device", "cpu"], capsys)
    assert code == 2 and "error: the avx512 kernels need avx512f, avx512bw, avx512_vnni, which this CPU" in err
    code, _, err = run(["eval", "--checkpoint", "x", "--corpus", "y", "--kernels", "neon"], capsys)
    assert code == 2 and "invalid choice: 'neon'" in err


def test_the_decode_path_evaluates_as_nn_lstm_does_and_each_format_costs_little(tiny: Checkpoint) -> None:
    ids = tiny.vocab.encode(make_corpus(40, seed=9)[:3000])
    reference = evaluate(tiny.model, ids)["bpc"]
    one_stream = evaluate_decoded(tiny.model, ids, "fp32", rows=1, warmup=0)
    assert one_stream["bpc"] == pytest.approx(reference, abs=1e-5) and one_stream["chars"] == len(ids) - 1
    split = {w: evaluate_decoded(tiny.model, ids, w, rows=8, warmup=64)["bpc"] for w in native.WEIGHT_FORMATS}
    assert abs(split["fp32"] - reference) < 0.05  # parts start from a zero state, 64 characters early
    assert abs(split["bf16"] - split["fp32"]) < 0.002 and abs(split["int8"] - split["fp32"]) < 0.01
    assert split["int8"] != split["fp32"]


def test_eval_prints_the_cost_of_a_format(tiny_checkpoint_path: Path, corpus_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["eval", "--checkpoint", str(tiny_checkpoint_path), "--corpus", str(corpus_path),
                        "--weights", "int8"], capsys)
    result = json.loads(out)
    assert code == 0 and result["weights"] == "int8" and 0 < result["bpc"] < 4
    assert result["cost_bpc"] == pytest.approx(result["bpc"] - result["fp32_bpc"], abs=2e-5)
    assert abs(result["cost_bpc"]) < 0.01
