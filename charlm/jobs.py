"""The engine's own records of work in progress: text going through nn.LSTM chunk by chunk (a long
seed's prefill, a text being scored) and an active request's decode row. Only charlm/engine.py uses
them; they live apart so that the engine's module is its scheduling loop.
"""

from __future__ import annotations

import time
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import torch

from charlm.constraint import CompiledConstraint
from charlm.handles import Generation, Handle, Scoring
from charlm.request import CharLogprob
from charlm.sampling import RowSampler
from charlm.steering import Steering
from charlm.stopping import StopStrings

__all__ = ["ChunkedJob", "Prefill", "ScoreJob", "Job", "Row"]


@dataclass(eq=False)  # identity: jobs are found in the queue by object, never compared by tensors
class ChunkedJob:
    """Text going through nn.LSTM chunk by chunk (a long seed, or a text to score), and how far it got."""

    ids: torch.Tensor  # (1, characters)
    _: KW_ONLY
    pos: int = 0  # characters fed to the model so far
    state: tuple[torch.Tensor, torch.Tensor] | None = None
    # sha256 of the text's prefixes that the prefix cache keys (charlm/prefix_cache.py), by length;
    # empty when there is no cache.
    digests: dict[int, bytes] = field(default_factory=dict)
    seconds: float = 0.0
    admitted: float = field(default_factory=time.perf_counter)


@dataclass(eq=False)
class Prefill(ChunkedJob):
    """A request whose seed is being run through the LSTM, chunk by chunk."""

    gen: Generation
    end_logits: torch.Tensor | None = None  # (vocab,) from the cache, when the whole seed was found there
    # Requests with the same long seed admitted while this one prefills (the n choices of one prompt):
    # they take its final state instead of computing the same chunks again.
    followers: list[Prefill] = field(default_factory=list)

    @property
    def handles(self) -> list[Handle[Any]]:
        return [self.gen, *(f.gen for f in self.followers)]


@dataclass(eq=False)
class ScoreJob(ChunkedJob):
    """A text being scored, chunk by chunk, with what its chunks found so far; each character fed to the
    model predicts the next one."""

    scoring: Scoring
    per_char: list[CharLogprob] = field(default_factory=list)

    @property
    def handles(self) -> list[Handle[Any]]:
        return [self.scoring]


Job = Prefill | ScoreJob  # what the prefill queue holds


@dataclass
class Row:
    """An active request's decoding state besides the batched LSTM state."""

    gen: Generation
    sampler: RowSampler
    token: int
    generated: list[str] = field(default_factory=list)
    emitted: int = 0
    admitted: float = 0.0
    prefill_s: float = 0.0
    decode_start: float = 0.0
    logprobs: list[CharLogprob] | None = None  # one per generated character, when the request asked
    pending: CharLogprob | None = None  # the entry of the character just sampled, before _advance takes it
    # The request's sampling settings as the samplers take them, worked out once instead of every step.
    scale: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    stops: StopStrings | None = None  # None when the request has no stop strings: nothing to check
    min_p: float = 0.0
    steering: Steering | None = None  # None when the request has no bias or penalty: nothing to change
    # With a constraint: its tables, the automaton's state after the characters so far, and whether
    # the text is to end here (a complete match the model chose to end)
    constraint: CompiledConstraint | None = None
    state: int = 0
    matched_end: bool = False
