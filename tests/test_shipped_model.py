"""The models the project ships: each loads, its card tells the truth, and its samples read as English."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from charlm import generate, load
from charlm.checkpoint import Checkpoint

MODELS = Path(__file__).resolve().parent.parent / "models"
CARDS = {"mysterious_island": "README.md", "verne_small": "verne_small.md"}  # every shipped model has a card
WORDS = MODELS / "mysterious_island.words.txt"  # both were trained on the same text


@pytest.fixture(scope="module", params=sorted(CARDS))
def shipped(request: pytest.FixtureRequest) -> tuple[str, Checkpoint]:
    return request.param, load(str(MODELS / f"{request.param}.safetensors"), "cpu")


def test_every_shipped_model_has_a_card() -> None:
    assert {p.stem for p in MODELS.glob("*.safetensors")} == set(CARDS)


def test_loads_and_metadata_matches_its_card(shipped: tuple[str, Checkpoint]) -> None:
    name, checkpoint = shipped

    def card_value(field: str) -> str:
        card = (MODELS / CARDS[name]).read_text()
        match = re.search(rf"^\| {re.escape(field)} \| ([^|]+) \|", card, re.MULTILINE)
        assert match, f"the card of {name} has no '{field}' row"
        return match.group(1).strip().strip("`")

    _check_card(checkpoint, card_value, MODELS / f"{name}.safetensors")


def _check_card(shipped: Checkpoint, card_value: Any, path: Path) -> None:
    assert path.stat().st_size < 30 * 2**20
    assert int(card_value("parameters").replace(",", "")) == shipped.model.num_parameters()
    assert float(card_value("held-out bits per character")) == pytest.approx(shipped.train["val_bpc"], abs=5e-4)
    assert card_value("corpus sha256") == shipped.train["corpus_sha256"]
    cfg = shipped.config
    architecture = (f"Embedding({cfg.vocab_size}, {cfg.embed}) → LSTM({cfg.embed}, {cfg.hidden}, "
                    f"layers={cfg.layers}) → Linear({cfg.hidden}, {cfg.vocab_size})")
    assert card_value("architecture") == architecture
    assert int(card_value("training steps").replace(",", "")) == shipped.train["steps"]


def test_sample_reads_as_english(shipped: tuple[str, Checkpoint]) -> None:
    _, checkpoint = shipped
    known = set(WORDS.read_text().split())
    assert checkpoint.train["corpus_sha256"] == load(str(MODELS / "mysterious_island.safetensors"), "cpu").train[
        "corpus_sha256"], "the word list is of another training text"
    text = generate(checkpoint, "The island", length=2000, scale_factor=2.0, random_seed=1).generated
    words = [w.lower() for w in re.findall(r"[A-Za-z]+", text)]
    assert len(words) > 250
    share = sum(w in known for w in words) / len(words)
    assert share >= 0.95, f"only {share:.1%} of generated words occur in the training text"
