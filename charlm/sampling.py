"""Logits → next character: scale_factor, top-k, top-p, and each request's own random stream.

Every function works on a batch of rows with per-row settings, and every row's result depends only
on that row: a request samples the same characters alone or among others.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

__all__ = ["SamplingParams", "RowSampler", "sample_rows", "new_random_seed", "MAX_RANDOM_SEED"]

MAX_RANDOM_SEED = 2**53 - 1  # drawn seeds stay exact in JSON clients that read numbers as doubles


def new_random_seed() -> int:
    """A fresh seed for a request that gave none; returned to the caller so the text can be reproduced."""
    return random.SystemRandom().randint(0, MAX_RANDOM_SEED)


@dataclass(frozen=True)
class SamplingParams:
    scale_factor: float = 1.0  # multiplies the logits (1/temperature): > 1 more predictable, < 1 more random
    top_k: int | None = None  # keep only the k most likely characters
    top_p: float | None = None  # keep the smallest most-likely set whose probability reaches p

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale_factor) and self.scale_factor > 0):
            raise ValueError(f"scale_factor must be a finite number > 0, got {self.scale_factor}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class RowSampler:
    """One request's sampling settings and its private random stream (Python's Mersenne Twister)."""

    def __init__(self, params: SamplingParams, random_seed: int):
        self.params = params
        self.rng = random.Random(random_seed)

    def uniform(self) -> float:
        return self.rng.random()


def sample_rows(
    logits: torch.Tensor,
    scale: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniforms: torch.Tensor,
) -> torch.Tensor:
    """Draw one id per row of `logits` (rows, vocab) by inverse CDF over the filtered distribution.

    scale (rows,) float; top_k (rows,) int (vocab size = off); top_p (rows,) float (> 1 = off);
    uniforms (rows,) in [0, 1). Sorting is stable, so ties break by id, deterministically.
    The engine's native sampler (charlm_sample in _native.c) draws the same ids; a test holds it to that.
    """
    z = (logits.float() * scale[:, None].float()).double()
    z_sorted, order = torch.sort(z, dim=1, descending=True, stable=True)
    probs = torch.softmax(z_sorted, dim=1)
    cdf = probs.cumsum(1)
    if bool((top_k < z.size(1)).any()) or bool((top_p <= 1).any()):  # else every mask is all ones
        rank = torch.arange(z.size(1), device=z.device)
        before = cdf - probs  # probability of the more likely characters
        keep = (rank[None, :] < top_k[:, None]) & (before < top_p[:, None].double())
        cdf = (probs * keep).cumsum(1)
    target = uniforms.double()[:, None].to(z.device) * cdf[:, -1:]
    choice = torch.searchsorted(cdf, target, right=True).clamp_(max=z.size(1) - 1)
    return order.gather(1, choice).squeeze(1)
