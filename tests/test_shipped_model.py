"""The model the project ships: it loads, its card tells the truth, and its samples read as English."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from charlm import generate, load
from charlm.checkpoint import Checkpoint

MODELS = Path(__file__).resolve().parent.parent / "models"
CHECKPOINT = MODELS / "mysterious_island.safetensors"


@pytest.fixture(scope="module")
def shipped() -> Checkpoint:
    return load(str(CHECKPOINT), "cpu")


def card_value(name: str) -> str:
    match = re.search(rf"^\| {re.escape(name)} \| ([^|]+) \|", (MODELS / "README.md").read_text(), re.MULTILINE)
    assert match, f"models/README.md has no '{name}' row"
    return match.group(1).strip().strip("`")


def test_loads_and_metadata_matches_its_card(shipped: Checkpoint) -> None:
    assert CHECKPOINT.stat().st_size < 30 * 2**20
    assert int(card_value("parameters").replace(",", "")) == shipped.model.num_parameters()
    assert float(card_value("held-out bits per character")) == pytest.approx(shipped.train["val_bpc"], abs=5e-4)
    assert card_value("corpus sha256") == shipped.train["corpus_sha256"]
    cfg = shipped.config
    architecture = (f"Embedding({cfg.vocab_size}, {cfg.embed}) → LSTM({cfg.embed}, {cfg.hidden}, "
                    f"layers={cfg.layers}) → Linear({cfg.hidden}, {cfg.vocab_size})")
    assert card_value("architecture") == architecture
    assert int(card_value("training steps").replace(",", "")) == shipped.train["steps"]


def test_sample_reads_as_english(shipped: Checkpoint) -> None:
    known = set((CHECKPOINT.with_suffix(".words.txt")).read_text().split())
    text = generate(shipped, "The island", length=2000, scale_factor=2.0, random_seed=1).generated
    words = [w.lower() for w in re.findall(r"[A-Za-z]+", text)]
    assert len(words) > 250
    share = sum(w in known for w in words) / len(words)
    assert share >= 0.95, f"only {share:.1%} of generated words occur in the training text"
