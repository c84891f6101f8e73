"""The engine's own records of work in progress: text going through nn.LSTM chunk by chunk (a long
seed's prefill, a text being scored), where those chunks end, and an active request's decode row.
Only the engine and the prefix cache it resumes jobs from (charlm/prefix_cache.py) use them; they
live apart so that the engine's module is its scheduling loop.
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

__all__ = ["PREFILL_CHUNK", "ChunkedJob", "Prefill", "ScoreJob", "Job", "Row", "chunk_bounds", "chunk_end"]

# Longer seeds, and texts to score, go through nn.LSTM in chunks of this many characters, one budget
# of them per loop.
PREFILL_CHUNK = 512


def chunk_end(pos: int, end: int) -> int:
    """Where the chunk of text [pos, end) that starts at `pos` ends: a whole PREFILL_CHUNK, else the
    largest power of two that fits. So nn.LSTM only ever sees 10 lengths: oneDNN keeps a compiled
    primitive for every length it is given (0.6 MiB each for the shipped model, up to 1,024 of them),
    and a client choosing its text's length must not choose how much memory the server keeps."""
    left = end - pos
    return pos + (PREFILL_CHUNK if left >= PREFILL_CHUNK else 1 << (left.bit_length() - 1))


def chunk_bounds(end: int) -> list[int]:
    """Where the chunks of a seed of `end` characters end, before its end. Every run of a text passes
    the same boundaries with the same chunks before them (whole chunks, then halving pieces), so a
    state kept at any of them is the one any longer text computes there: a seed sent again with more
    text resumes at the last piece the two share, not only at a multiple of PREFILL_CHUNK."""
    bounds, pos = [], 0
    while (pos := chunk_end(pos, end)) < end:
        bounds.append(pos)
    return bounds



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
