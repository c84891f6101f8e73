"""evaluate_many (the held-out tails side by side) against evaluate (one stream), and how training uses it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import charlm.train
from charlm.checkpoint import read_safetensors
from charlm.corpora import load_corpora
from charlm.evaluate import evaluate, evaluate_many
from charlm.model import CharLSTM, ModelConfig
from charlm.train import train
from charlm.train_config import TrainConfig
from tests.conftest import make_corpus, tiny_config

VOCAB = 23


def random_model(seed: int = 0) -> CharLSTM:
    """A tiny untrained model: its predictions depend on the whole left context, which is what carrying
    the state (and not leaking padding into it) is about."""
    torch.manual_seed(seed)
    model = CharLSTM(ModelConfig(VOCAB, embed=8, hidden=24, layers=2, dropout=0.2))
    model.train()  # evaluation must switch dropout off, and leave the model as it found it
    return model


def random_tails(lengths: list[int], seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(VOCAB, (n,), generator=generator) for n in lengths]


# Chunks of 64: tails shorter than one chunk, ending just before, on and after a chunk boundary, spanning
# several chunks; too short to predict anything (0 and 1 characters); in no particular order.
LENGTHS = [300, 1, 64, 65, 1000, 0, 2, 37, 129, 1000, 500]


@pytest.mark.parametrize("chunk", [64, 4096])
def test_each_figure_is_evaluates_for_that_tail(chunk: int) -> None:
    model, tails = random_model(), random_tails(LENGTHS)
    many = evaluate_many(model, tails, chunk=chunk)
    assert model.training
    assert len(many) == len(tails)
    for ids, got in zip(tails, many):
        want = evaluate(model, ids)
        assert got["chars"] == want["chars"] == max(len(ids) - 1, 0)
        assert got["bpc"] == pytest.approx(want["bpc"], abs=1e-6)
        assert got["nats"] == pytest.approx(want["nats"], abs=1e-6)


def test_a_tail_figure_does_not_depend_on_the_others() -> None:
    """The padding after a short tail, and the rows beside it, never reach its state: alone or among
    longer and shorter tails, its figure is the same."""
    model = random_model(seed=3)
    short, long, other = random_tails([100, 700, 250], seed=4)
    alone = evaluate_many(model, [short], chunk=64)[0]["bpc"]
    among = evaluate_many(model, [long, short, other], chunk=64)[1]["bpc"]
    assert among == pytest.approx(alone, abs=1e-6)


def test_no_tails_and_tails_too_short_to_predict() -> None:
    model = random_model()
    assert evaluate_many(model, []) == []
    assert [r["chars"] for r in evaluate_many(model, random_tails([0, 1]))] == [0, 0]


def shelf_config(tmp_path: Path, **overrides: Any) -> TrainConfig:
    """Three small corpora (the last one selected); evaluations every 2 steps, every corpus every 3rd."""
    paths = []
    for i, sentences in enumerate([500, 700, 600]):
        path = tmp_path / f"{'abc'[i]}.txt"
        path.write_text(make_corpus(sentences, seed=10 + i))
        paths.append(str(path))
    base = tiny_config(Path(paths[0]), tmp_path / "m.safetensors", steps=13, eval_interval=2, eval_all_every=3,
                       hidden=24, log_interval=100)
    return TrainConfig(**{**base.__dict__, "corpus": tuple(paths), **overrides})


def count_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of tails of each evaluate_many call training makes, from now on."""
    calls: list[int] = []
    real = charlm.train.evaluate_many

    def counting(model: CharLSTM, tails: list[torch.Tensor]) -> list[dict[str, float]]:
        calls.append(len(tails))
        return real(model, tails)

    monkeypatch.setattr(charlm.train, "evaluate_many", counting)
    return calls


def eval_rows(cfg: TrainConfig) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in cfg.metrics_path.read_text().splitlines()]
    return [r for r in rows if "val_bpc" in r]


def test_training_evaluates_the_selected_corpus_every_time_and_all_every_nth_and_at_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_batches(monkeypatch)
    cfg = shelf_config(tmp_path)
    result = train(cfg)
    names = ["a.txt", "b.txt", "c.txt"]
    rows = eval_rows(cfg)
    # Evaluations at steps 2, 4, …, 12 and at the end (13): every corpus at the 1st, 4th and the last.
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12, 13]
    full = [r["step"] for r in rows if set(r["val_bpc_by_corpus"]) == set(names)]
    assert full == [2, 8, 13]
    assert calls == [3, 1, 1, 3, 1, 1, 3]  # all tails of one evaluation in one batch
    for r in rows:
        assert r["val_bpc"] == r["val_bpc_by_corpus"]["c.txt"]  # the last corpus is selected, and always there
        assert set(r["val_bpc_by_corpus"]) in ({"c.txt"}, set(names))
        assert ("val_bpc_all" in r) == (r["step"] in full)
    assert min(r["val_bpc"] for r in rows) == pytest.approx(result.best_val_bpc)
    # The last row's figures are `charlm eval`'s (one stream per tail) for the final weights.
    tensors, _ = read_safetensors(cfg.state_path)
    data = load_corpora(cfg.corpus, cfg.val_fraction)
    model = CharLSTM(ModelConfig(len(data.vocab), cfg.embed, cfg.hidden, cfg.layers, cfg.dropout))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for name, ids in zip(data.names, data.val_ids()):
        assert rows[-1]["val_bpc_by_corpus"][name] == pytest.approx(evaluate(model, ids)["bpc"], abs=1e-6)
    by_chars = [(evaluate(model, ids)["nats"], len(ids) - 1) for ids in data.val_ids()]
    nats = sum(n * c for n, c in by_chars) / sum(c for _, c in by_chars)
    assert rows[-1]["val_bpc_all"] == pytest.approx(nats / charlm.train.LN2, abs=1e-6)


def test_eval_all_every_1_evaluates_every_corpus_each_time(tmp_path: Path) -> None:
    cfg = shelf_config(tmp_path, steps=6, eval_all_every=1)
    train(cfg)
    rows = eval_rows(cfg)
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all(len(r["val_bpc_by_corpus"]) == 3 and "val_bpc_all" in r for r in rows)


def test_a_run_stopped_after_a_selected_only_evaluation_ends_on_every_corpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_batches(monkeypatch)
    def stop_at_4(row: dict[str, Any]) -> None:
        if "val_bpc" in row and row["step"] == 4 and not getattr(stop_at_4, "fired", False):
            stop_at_4.fired = True  # type: ignore[attr-defined]
            raise KeyboardInterrupt  # as Ctrl-C during the evaluation's last moments would

    cfg = shelf_config(tmp_path)
    result = train(cfg, stop_at_4)
    assert result.interrupted and result.step == 4
    rows = eval_rows(cfg)
    assert [r["step"] for r in rows] == [2, 4, 4]
    assert set(rows[1]["val_bpc_by_corpus"]) == {"c.txt"} and "val_bpc_all" not in rows[1]
    assert len(rows[2]["val_bpc_by_corpus"]) == 3 and "val_bpc_all" in rows[2]
    assert rows[2]["val_bpc"] == rows[1]["val_bpc"]
    assert calls == [3, 1, 2]  # the selected tail, evaluated at step 4 already, is not evaluated again
