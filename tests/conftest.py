"""Shared fixtures: a tiny corpus and a tiny trained model, built here, never read from ../shared."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from charlm.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from charlm.engine import Engine
from charlm.model import CharLSTM
from charlm.train import train
from charlm.train_config import TrainConfig

# Tiny models gain nothing from threads, and a second thread only fights whatever else runs.
torch.set_num_threads(1)

WORDS = (
    "the engineer and the sailor walked along the shore of the island while the reporter "
    "wrote in his notebook and the boy gathered wood for the fire near the granite cliff"
).split()


def make_corpus(n_sentences: int = 1200, seed: int = 0) -> str:
    """English-like text with real structure (capitals, punctuation, word order) to learn from."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(n_sentences):
        start = rng.randrange(len(WORDS) - 8)
        words = WORDS[start : start + rng.randint(4, 8)]
        sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?"]))
    return " ".join(sentences) + "\n"


@pytest.fixture(scope="session")
def corpus_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(make_corpus(), encoding="utf-8")
    return path


def tiny_config(corpus: Path, out: Path, **overrides: object) -> TrainConfig:
    options: dict[str, object] = dict(
        corpus=str(corpus), out=str(out), embed=16, hidden=48, layers=2, dropout=0.0, seq_len=32,
        batch_size=8, lr=1e-2, steps=150, eval_interval=50, warmup_steps=10, device="cpu",
    )
    options.update(overrides)
    return TrainConfig(**options)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tiny_checkpoint_path(corpus_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    train(tiny_config(corpus_path, out))
    return out


@pytest.fixture(scope="session")
def tiny(tiny_checkpoint_path: Path) -> Checkpoint:
    return load_checkpoint(tiny_checkpoint_path)


def default_engine(app: Any) -> Engine:
    """The engine of a running app's default model (loaded at start)."""
    served = app.state.models.served(app.state.models.default)
    assert served is not None, "the default model is not loaded"
    engine: Engine = served.engine
    return engine


def make_other(tiny: Checkpoint, path: Path, scale: float = 0.8) -> Path:
    """A second model: the tiny one's weights scaled (another distribution over the same characters)."""
    other = CharLSTM(tiny.model.config)
    other.load_state_dict({k: v * scale for k, v in tiny.model.state_dict().items()})
    save_checkpoint(path, other, tiny.vocab, {**tiny.train, "val_bpc": 9.5})
    return path


@pytest.fixture
def models_dir(tmp_path: Path, tiny_checkpoint_path: Path, tiny: Checkpoint) -> Path:
    """A directory of two models: a (the tiny one) and b (make_other of it)."""
    directory = tmp_path / "models"
    directory.mkdir()
    shutil.copy(tiny_checkpoint_path, directory / "a.safetensors")
    make_other(tiny, directory / "b.safetensors")
    return directory
