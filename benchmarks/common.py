"""Helpers shared by the benchmarks: where the corpus and the model are, medians, the matmul rate."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "mysterious_island.txt"
MODEL = ROOT / "models" / "mysterious_island.safetensors"


def median(values: list[float]) -> float:
    return statistics.median(values)


def corpus_text() -> str:
    """The default corpus (shipped in data/); without it any long English-like text will do for speed."""
    from charlm.text import load_corpus

    if CORPUS.exists():
        return load_corpus(CORPUS)
    from tests.conftest import make_corpus

    return make_corpus(40_000)


def matmul_gflops() -> float:
    """This machine's float32 matrix-multiply rate on a large square product: the ceiling for
    any LSTM work, which is matrix multiplies plus a little elementwise arithmetic."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    start, n = time.perf_counter(), 10
    for _ in range(n):
        a @ b
    return 2 * 2048**3 * n / (time.perf_counter() - start) / 1e9


def cpu_info(field: str) -> str:
    """The first CPU's `field` in /proc/cpuinfo ("model name", "flags"); empty where Linux does not say."""
    path = Path("/proc/cpuinfo")
    for line in (path.read_text().splitlines() if path.exists() else []):
        if line.split(":", 1)[0].strip() == field:
            return line.split(":", 1)[1].strip()
    return ""
