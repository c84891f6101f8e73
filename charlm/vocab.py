"""The character vocabulary: ids <-> characters, saved with the weights so a model is usable alone."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["Vocab", "UnknownCharactersError"]


class UnknownCharactersError(ValueError):
    """Text holds characters the model never saw; `chars` names them."""

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        shown = ", ".join(repr(c) for c in self.chars[:20])
        more = f" and {len(self.chars) - 20} more" if len(self.chars) > 20 else ""
        super().__init__(f"characters not in the model's vocabulary: {shown}{more}")


@dataclass(frozen=True)
class Vocab:
    """Characters in id order (sorted at construction from text, so ids are deterministic)."""

    chars: tuple[str, ...]
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_chars(self.chars)
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.chars)})

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        return cls(tuple(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def __contains__(self, char: object) -> bool:
        return char in self._index

    def unknown(self, text: str) -> list[str]:
        """Characters of `text` that are not in the vocabulary, sorted, each once."""
        return sorted(set(text) - self._index.keys())

    def encode(self, text: str) -> torch.Tensor:
        """Text → int64 tensor of ids; raises UnknownCharactersError naming what is missing.

        Vectorised (code points looked up in the sorted vocabulary with numpy): a Python loop over
        characters took seconds for a shelf of books; this takes a small fraction of one.
        """
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        sorted_codes, order = self._lookup
        pos = np.searchsorted(sorted_codes, codes).clip(max=len(sorted_codes) - 1)
        if not np.array_equal(sorted_codes[pos], codes):
            raise UnknownCharactersError(self.unknown(text))
        return torch.from_numpy(order[pos])

    @functools.cached_property
    def _lookup(self) -> tuple[np.ndarray, np.ndarray]:
        """The vocabulary's code points in ascending order, and each one's id (int64)."""
        codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        order = np.argsort(codes, kind="stable")
        return codes[order], order.astype(np.int64)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return "".join(self.chars[i] for i in ids)

    def to_json(self) -> str:
        return json.dumps(list(self.chars), ensure_ascii=False)

    @classmethod
    def from_json(cls, data: str) -> Vocab:
        """Raises ValueError (never RecursionError or TypeError) for anything but a list of characters."""
        try:
            chars = json.loads(data)
        except RecursionError:
            raise ValueError("vocabulary JSON is nested too deeply; it must be a flat list of characters") from None
        if not isinstance(chars, list) or not all(isinstance(c, str) for c in chars):
            raise ValueError("vocabulary JSON must be a list of characters")
        return cls(tuple(chars))


def _check_chars(chars: tuple[str, ...]) -> None:
    """Distinct single characters that UTF-8 can encode.

    A lone surrogate (U+D800..U+DFFF) is a valid Python str but cannot be written as UTF-8, so a
    vocabulary holding one would load and only fail later, when a response lists the characters.
    """
    seen: set[str] = set()
    for c in chars:
        if not isinstance(c, str) or len(c) != 1:
            raise ValueError(f"a vocabulary is a list of distinct single characters, got {_shorten(c)}")
        if c in seen:
            raise ValueError(f"a vocabulary is a list of distinct single characters, {c!r} appears twice")
        try:
            c.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                f"vocabulary character U+{ord(c):04X} cannot be encoded as UTF-8 (a lone surrogate); "
                "a vocabulary holds only real characters"
            ) from None
        seen.add(c)


def _shorten(value: object, limit: int = 40) -> str:
    """repr of `value`, cut so that an error message stays short whatever the input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
