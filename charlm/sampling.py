"""Logits → next character: scale_factor, top-k, top-p, greedy, and each request's own random stream.

Every function works on a batch of rows with per-row settings, and every row's result depends only
on that row: a request samples the same characters alone or among others.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # only the type: importing sampling must not load the engine's kernels
    from charlm.native import Kernels

__all__ = [
    "SamplingParams",
    "InvalidParameter",
    "RowSampler",
    "sample_batch",
    "sample_rows",
    "new_random_seed",
    "MAX_RANDOM_SEED",
    "MAX_SCALE_FACTOR",
    "MAX_TOP_K",
    "TOP_P_OFF",
]

MAX_RANDOM_SEED = 2**53 - 1  # drawn seeds stay exact in JSON clients that read numbers as doubles

# Logits (tens at most) times this stay far inside float32, where the samplers scale them; beyond
# about 100 the draw is already the most likely character, so a larger factor buys nothing.
MAX_SCALE_FACTOR = 1e4

# No vocabulary can hold more characters than Unicode has code points; a larger top_k filters
# nothing, so bounding it keeps every top_k inside the 32-bit ints the native sampler takes.
MAX_TOP_K = 0x110000

# The "filter off" values the samplers (sample_rows and _native.c's charlm_sample) understand:
# top_k >= vocabulary size keeps every character, top_p above 1 keeps the whole distribution.
TOP_P_OFF = 2.0


class InvalidParameter(ValueError):
    """A sampling setting outside its range; `field` names it, `message` says what is allowed."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field, self.message = field, message


def new_random_seed() -> int:
    """A fresh seed for a request that gave none; returned to the caller so the text can be reproduced."""
    return random.SystemRandom().randint(0, MAX_RANDOM_SEED)


@dataclass(frozen=True)
class SamplingParams:
    scale_factor: float = 1.0  # multiplies the logits (1/temperature): > 1 more predictable, < 1 more random
    top_k: int | None = None  # keep only the k most likely characters
    top_p: float | None = None  # keep the smallest most-likely set whose probability reaches p
    # Always the most likely character (argmax; ties go to the lowest id), with no randomness: OpenAI's
    # temperature 0. The other three settings then change nothing.
    greedy: bool = False

    def __post_init__(self) -> None:
        scale = self.scale_factor
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise InvalidParameter("scale_factor", f"must be a number, got {type(scale).__name__}")
        if not (math.isfinite(scale) and 0 < scale <= MAX_SCALE_FACTOR):
            raise InvalidParameter("scale_factor", f"must be a finite number > 0 and <= {MAX_SCALE_FACTOR:g}, "
                                   f"got {scale}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)):
            raise InvalidParameter("top_k", f"must be a whole number, got {type(self.top_k).__name__}")
        if self.top_k is not None and not 1 <= self.top_k <= MAX_TOP_K:
            raise InvalidParameter("top_k", f"must be between 1 and {MAX_TOP_K}, got {self.top_k}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise InvalidParameter("top_p", f"must be in (0, 1], got {self.top_p}")
        if not isinstance(self.greedy, bool):
            raise InvalidParameter("greedy", f"must be true or false, got {type(self.greedy).__name__}")

    def top_k_for(self, vocab_size: int) -> int:
        """top_k as the samplers take it: at most the vocabulary size, which means no filter; 1 when
        greedy, which both samplers read as argmax (the first of the stable sort: ties to the lowest id)."""
        if self.greedy:
            return 1
        return vocab_size if self.top_k is None else min(self.top_k, vocab_size)

    @property
    def top_p_or_off(self) -> float:
        return TOP_P_OFF if self.top_p is None or self.greedy else self.top_p

    @property
    def sampler_scale(self) -> float:
        """scale_factor as the samplers take it: 1 when greedy, so that rounding of the scaled logits
        can never turn two close logits into a tie and the pick is the argmax of the logits themselves."""
        return 1.0 if self.greedy else float(self.scale_factor)


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
    top_k 1 is greedy decoding: the first id of that order, whatever the uniform.
    The engine's native sampler (charlm_sample in _native.c) draws the same ids; a test holds it to that.
    """
    z = (logits.float() * scale[:, None].float()).double()
    if bool((top_k == 1).all()):  # all greedy: argmax returns the first maximum, as the stable sort does
        return z.argmax(1)
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


def sample_batch(
    logits: torch.Tensor,
    scale: list[float],
    top_k: list[int],
    top_p: list[float],
    uniforms: list[float],
    kernels: Kernels | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One id per row of `logits` (rows, vocab), each row with its own settings (as SamplingParams'
    sampler_scale, top_k_for and top_p_or_off give them) and its own uniform draw in [0, 1).

    With `kernels`, the native sampler draws them into `out` (a long tensor of at least `rows` rows,
    overwritten by the next call); without, sample_rows does. Both draw the same ids.
    """
    if kernels is not None:
        if out is None:
            raise ValueError("the native sampler needs an `out` buffer")
        return kernels.sample(logits.float().contiguous(), scale, top_k, top_p, uniforms, out)
    dev = logits.device
    return sample_rows(
        logits,
        torch.tensor(scale, device=dev),
        torch.tensor(top_k, device=dev),
        torch.tensor(top_p, device=dev),
        torch.tensor(uniforms, dtype=torch.float64),
    )
