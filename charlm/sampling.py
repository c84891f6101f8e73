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

# The ranges OpenAI (bias, presence and frequency penalties) and vLLM (repetition penalty) allow.
MAX_LOGIT_BIAS = 100.0
MAX_PENALTY = 2.0
MAX_REPETITION_PENALTY = 100.0  # vLLM takes any value > 0; beyond this the logits are already flattened


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
    # temperature 0. scale_factor, top_k, top_p and min_p then change nothing; bias and penalties do.
    greedy: bool = False
    min_p: float = 0.0  # keep characters at least this times as likely as the most likely one (0: off)
    # Added to the logits of these vocabulary ids before anything else (-100 bans one): (id, bias) pairs.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # OpenAI's penalties over the characters generated so far: logit -= frequency * count + presence * (count > 0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's, over the seed's and the generated characters: a positive logit divided by it, a negative one
    # multiplied (1: off; above 1 discourages repeating)
    repetition_penalty: float = 1.0

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
        _check_range("min_p", self.min_p, 0.0, 1.0)
        _check_range("presence_penalty", self.presence_penalty, -MAX_PENALTY, MAX_PENALTY)
        _check_range("frequency_penalty", self.frequency_penalty, -MAX_PENALTY, MAX_PENALTY)
        _check_range("repetition_penalty", self.repetition_penalty, 0.0, MAX_REPETITION_PENALTY, low_open=True)
        for entry in self.logit_bias:
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], int)
                    and not isinstance(entry[0], bool) and entry[0] >= 0):
                raise InvalidParameter("logit_bias", "must map vocabulary ids (whole numbers >= 0) to biases")
            _check_range("logit_bias", entry[1], -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)

    @property
    def steers(self) -> bool:
        """Whether the logits change before sampling (a bias or a penalty): then the engine keeps counts."""
        return bool(self.logit_bias) or self.penalizes

    @property
    def penalizes(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

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


def _check_range(name: str, value: object, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidParameter(name, f"must be a finite number, got {value!r}"[:200])
    if not (low < value <= high if low_open else low <= value <= high):
        raise InvalidParameter(name, f"must be in {'(' if low_open else '['}{low:g}, {high:g}], got {value:g}")


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
    min_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw one id per row of `logits` (rows, vocab) by inverse CDF over the filtered distribution.

    scale (rows,) float; top_k (rows,) int (vocab size = off); top_p (rows,) float (> 1 = off);
    uniforms (rows,) in [0, 1); min_p (rows,) float (0 = off): a character is kept when it is among
    the top_k, the mass before it is below top_p, and its probability is at least min_p times the
    most likely one's. Each filter is measured on the whole distribution, so their order does not
    matter (min_p's ratio to the top is the same before and after the others). Sorting is stable,
    so ties break by id, deterministically.
    top_k 1 is greedy decoding: the first id of that order, whatever the uniform.
    The engine's native sampler (charlm_sample in _native.c) draws the same ids; a test holds it to that.
    """
    z = (logits.float() * scale[:, None].float()).double()
    if bool((top_k == 1).all()):  # all greedy: argmax returns the first maximum, as the stable sort does
        return z.argmax(1)
    z_sorted, order = torch.sort(z, dim=1, descending=True, stable=True)
    probs = torch.softmax(z_sorted, dim=1)
    cdf = probs.cumsum(1)
    min_p = torch.zeros(len(z), dtype=torch.float64) if min_p is None else min_p.double()
    if bool((top_k < z.size(1)).any()) or bool((top_p <= 1).any()) or bool((min_p > 0).any()):
        rank = torch.arange(z.size(1), device=z.device)
        before = cdf - probs  # probability of the more likely characters
        keep = (rank[None, :] < top_k[:, None]) & (before < top_p[:, None].double())
        keep &= probs >= min_p[:, None].to(z.device) * probs[:, :1]
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
    min_p: list[float] | None = None,
) -> torch.Tensor:
    """One id per row of `logits` (rows, vocab), each row with its own settings (as SamplingParams'
    sampler_scale, top_k_for and top_p_or_off give them) and its own uniform draw in [0, 1).

    With `kernels`, the native sampler draws them into `out` (a long tensor of at least `rows` rows,
    overwritten by the next call); without, sample_rows does. Both draw the same ids.
    """
    if kernels is not None:
        if out is None:
            raise ValueError("the native sampler needs an `out` buffer")
        return kernels.sample(logits.float().contiguous(), scale, top_k, top_p, min_p or [0.0] * len(scale), uniforms,
                              out)
    dev = logits.device
    return sample_rows(
        logits,
        torch.tensor(scale, device=dev),
        torch.tensor(top_k, device=dev),
        torch.tensor(top_p, device=dev),
        torch.tensor(uniforms, dtype=torch.float64),
        None if min_p is None else torch.tensor(min_p, dtype=torch.float64),
    )
