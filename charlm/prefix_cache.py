"""The prefix cache: LSTM states after prefixes of long texts, so that text sent again is not run again.

An LSTM's state after any prefix is a few kilobytes (layers x (h, c) x hidden floats) whatever the
prefix's length, where a transformer's key-value cache grows with it. The engine runs long seeds and
scored texts through nn.LSTM in chunks aligned at multiples of PREFILL_CHUNK from the start (then,
for a seed, in halving pieces: jobs.chunk_bounds), and keeps here the state at each boundary (and
at the end of a seed, with the logits that follow it). A later text resumes from the longest prefix
found and runs only the rest, in the same chunks an uncached run would use: the state it resumes
from is the one that run computes there, bit for bit, so the text never depends on the cache. A
scored chunk also keeps its per-character entries, so a growing document is scored again only from
its last boundary.

Entries are keyed by the model's version (never shared between models or versions) and the sha256
of the prefix (the text itself is not kept), and evicted least recently used past the byte budget.
The engines' worker fills and reads it; the registry drops a version's entries from the event loop,
so every operation takes a lock (uncontended: the cost of a few attribute reads).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from charlm.jobs import PREFILL_CHUNK, ChunkedJob, Prefill, ScoreJob, chunk_bounds
from charlm.request import CharLogprob

__all__ = ["CachedState", "CacheStats", "PrefixCache", "PrefixStates", "prefix_digests"]

# Bytes an entry costs besides its tensors: the key, the record, the ordered dict's node.
ENTRY_OVERHEAD = 400
# Bytes a cached per-character entry costs (a CharLogprob with its packed alternatives).
SCORE_ENTRY_BYTES = 250


@dataclass(frozen=True)
class CachedState:
    """The LSTM state after a prefix, as nn.LSTM takes it: h and c of shape (layers, 1, hidden)."""

    h: torch.Tensor
    c: torch.Tensor
    logits: torch.Tensor | None = None  # (vocab,) predicting the character after the prefix; at a seed's end
    scores: tuple[CharLogprob, ...] | None = None  # the entries of the scored chunk that ends here
    top_k: int = 0  # how many alternatives each of `scores` holds

    @property
    def nbytes(self) -> int:
        tensors = [t for t in (self.h, self.c, self.logits) if t is not None]
        return (ENTRY_OVERHEAD + sum(t.numel() * t.element_size() for t in tensors)
                + len(self.scores or ()) * SCORE_ENTRY_BYTES)


@dataclass
class CacheStats:
    hits: int = 0  # texts that resumed from a cached prefix
    misses: int = 0  # texts that found none
    chars_saved: int = 0  # characters not run through the model again
    bytes: int = 0  # held now
    entries: int = 0


Key = tuple[str, str, bytes]  # (model version, kind, sha256 of the prefix)


class PrefixCache:
    """Least-recently-used states by (model version, kind, prefix digest), within `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Key, CachedState] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CacheStats()

    def get(self, key: Key) -> CachedState | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: Key, entry: CachedState) -> None:
        size = entry.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.stats.bytes -= old.nbytes
            self._entries[key] = entry
            self.stats.bytes += size
            while self.stats.bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.stats.bytes -= evicted.nbytes
            self.stats.entries = len(self._entries)

    def drop(self, version: str) -> None:
        """Forget a model version's states (it was unloaded or replaced)."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == version]:
                self.stats.bytes -= self._entries.pop(key).nbytes
            self.stats.entries = len(self._entries)

    def counted(self, saved: int) -> None:
        """Count a text that looked here: `saved` characters it did not run again (0: a miss)."""
        with self._lock:
            if saved:
                self.stats.hits += 1
                self.stats.chars_saved += saved
            else:
                self.stats.misses += 1


class PrefixStates:
    """One model version's use of the cache: where a job's text resumes, and what its chunks leave
    behind (the engine's worker calls these; with no cache they do nothing)."""

    def __init__(self, cache: PrefixCache | None, version: str):
        self.cache, self.version = cache, version

    def _digests(self, job: ChunkedJob, text: str, bounds: list[int]) -> list[int]:
        """Give `job` the digests of its text's prefixes the cache keys; return `bounds`, the chunk
        boundaries before the text's end."""
        job.digests = prefix_digests(text, sorted({*bounds, *(b + 1 for b in bounds), len(text)}))
        return bounds

    def resume_prefill(self, job: Prefill, seed: str) -> None:
        """Start a long seed from the longest prefix of it the cache holds (all of it, with the logits
        that follow it, when the same seed came before)."""
        if self.cache is None:
            return
        bounds = self._digests(job, seed, chunk_bounds(len(seed)))
        found = self.cache.get((self.version, "end", job.digests[len(seed)]))
        if found is not None and found.logits is not None:
            job.pos, job.state, job.end_logits = len(seed), (found.h, found.c), found.logits
        else:
            for b in reversed(bounds):
                if (found := self.cache.get((self.version, "state", job.digests[b]))) is not None:
                    job.pos, job.state = b, (found.h, found.c)
                    break
        self.cache.counted(job.pos)

    def resume_scoring(self, job: ScoreJob, text: str, top_k: int) -> None:
        """Start a scored text after the longest run of whole chunks whose entries the cache holds (with
        at least `top_k` alternatives each) and whose end state it holds."""
        if self.cache is None:
            return
        entries: list[CharLogprob] = []
        resumed: tuple[int, CachedState] | None = None
        for b in self._digests(job, text, list(range(PREFILL_CHUNK, len(text), PREFILL_CHUNK))):
            scores = self.cache.get((self.version, "scores", job.digests[b + 1]))
            state = self.cache.get((self.version, "state", job.digests[b]))
            if scores is None or scores.scores is None or scores.top_k < top_k or state is None:
                break
            entries += scores.scores if scores.top_k == top_k else [_fewer(e, top_k) for e in scores.scores]
            resumed = b, state
        if resumed is not None:
            job.pos, job.state = resumed[0], (resumed[1].h, resumed[1].c)
            job.per_char = [CharLogprob(text[0], None), *entries]
        self.cache.counted(job.pos)

    def keep(self, job: ChunkedJob, kind: str, length: int, **extra: Any) -> None:
        """Cache `job`'s state after its first `length` characters (they end a whole chunk, or its text)."""
        if self.cache is not None and job.state is not None and length in job.digests:
            h, c = job.state
            self.cache.put((self.version, kind, job.digests[length]), CachedState(h, c, **extra))


def _fewer(entry: CharLogprob, top_k: int) -> CharLogprob:
    """A cached entry with only its top_k most likely alternatives (they were sorted over the whole
    vocabulary, so the first top_k are what asking for top_k gives)."""
    if not top_k:
        return CharLogprob(entry.char, entry.logprob)
    return CharLogprob(entry.char, entry.logprob, entry.top_chars[:top_k], entry.top_logprobs[:top_k])


def prefix_digests(text: str, lengths: Sequence[int]) -> dict[int, bytes]:
    """sha256 of text[:n] for each n in `lengths` (ascending), in one pass over the text."""
    digest = hashlib.sha256()
    out: dict[int, bytes] = {}
    done = 0
    for n in lengths:
        digest.update(text[done:n].encode("utf-8", "surrogatepass"))
        done = n
        out[n] = digest.copy().digest()
    return out
