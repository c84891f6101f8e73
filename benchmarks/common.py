"""Helpers shared by the benchmarks: where the corpus and the model are, medians."""

from __future__ import annotations

import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "data" / "mysterious_island.txt"
MODEL = ROOT / "models" / "mysterious_island.safetensors"


def median(values: list[float]) -> float:
    return statistics.median(values)


def corpus_text() -> str:
    """The default corpus when present; otherwise any long English-like text will do for speed."""
    from charlm.text import load_corpus

    if CORPUS.exists():
        return load_corpus(CORPUS)
    from tests.conftest import make_corpus

    return make_corpus(40_000)
