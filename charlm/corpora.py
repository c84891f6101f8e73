"""The texts a run learns from: one or several corpora, each split into its own training part and
held-out tail, so no held-out text of any corpus is ever trained on.

A corpus is one file (a directory stands for its *.txt files, in name order). Each is read and
normalised on its own (charlm.text), then split by position; the vocabulary covers them all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from charlm.inputs import input_errors
from charlm.text import CorpusError, corpus_files, load_corpus, split_text
from charlm.vocab import Vocab

__all__ = ["Corpus", "CorpusSet", "load_corpora", "sha256_text"]


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Corpus:
    name: str  # the file's name: how metrics and --select-on refer to it
    source: str  # what the user gave (a path, a directory or a URL)
    sha256: str  # of the normalised text, before the split
    train: str
    val: str

    def record(self) -> dict[str, Any]:
        """What a checkpoint's training summary keeps about this corpus."""
        return {"name": self.name, "source": self.source, "sha256": self.sha256,
                "train_chars": len(self.train), "val_chars": len(self.val)}


@dataclass(frozen=True)
class CorpusSet:
    corpora: tuple[Corpus, ...]
    vocab: Vocab

    @property
    def sha256(self) -> str:
        """One corpus: its text's sha256 (as single-corpus runs always recorded); several: of their hashes."""
        if len(self.corpora) == 1:
            return self.corpora[0].sha256
        return hashlib.sha256("\n".join(c.sha256 for c in self.corpora).encode()).hexdigest()

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.corpora]

    def train_ids(self) -> torch.Tensor:
        """Every corpus's training part, one after another."""
        return torch.cat([self.vocab.encode(c.train) for c in self.corpora])

    def val_ids(self) -> list[torch.Tensor]:
        return [self.vocab.encode(c.val) for c in self.corpora]

    def train_chars(self) -> int:
        return sum(len(c.train) for c in self.corpora)

    def select(self, name: str | None) -> int:
        """Index of the corpus whose held-out bpc picks the best checkpoint: `name`, or the last one."""
        if name is None:
            return len(self.corpora) - 1
        matches = [i for i, c in enumerate(self.corpora) if name in (c.name, Path(c.name).stem)]
        if len(matches) != 1:
            problem = "names no corpus" if not matches else "names several corpora"
            raise CorpusError(f"select_on {name!r} {problem}; the corpora are: {', '.join(self.names)}")
        return matches[0]


def load_corpora(
    sources: Sequence[str], val_fraction: float, strip: bool = True, quotes: str = "keep",
    names: Sequence[str] | None = None,
) -> CorpusSet:
    """Read every source (files, or directories of *.txt), normalise and split each on its own.

    `names` optionally gives, per source, what to record as its source (e.g. the URL a file was
    downloaded from)."""
    corpora = []
    for i, source in enumerate(sources):
        shown = names[i] if names else source
        for path in corpus_files([source]):
            with input_errors(CorpusError, path, "UTF-8 text corpus"):
                text = load_corpus(path, strip=strip, quotes=quotes)
            train, val = split_text(text, val_fraction)
            recorded = str(path) if Path(source).is_dir() else shown
            corpora.append(Corpus(path.name, recorded, sha256_text(text), train, val))
    chars: set[str] = set().union(*(set(c.train) | set(c.val) for c in corpora))
    vocab = Vocab.from_text("".join(chars))
    return CorpusSet(tuple(corpora), vocab)
