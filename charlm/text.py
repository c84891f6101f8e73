"""Reading a training corpus: decoding, newline normalisation, Gutenberg boilerplate, the split.

Everything a model learns comes through here, so the rules are strict and explicit: the file must
be UTF-8 (a BOM is dropped), CRLF/CR become LF, and a Project Gutenberg licence header/footer is
cut (with the edition's `_italics_` markers) so the model does not learn (and is not evaluated on)
legal text or markup. Optionally straight quotes become typographic ones (charlm.typography), so
books of several editions spell each symbol one way. A corpus may be several files: a directory
stands for its *.txt files in name order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from charlm.typography import normalize, strip_italics

__all__ = ["CorpusError", "read_text", "strip_gutenberg", "split_text", "load_corpus", "corpus_files"]


class CorpusError(ValueError):
    """The corpus cannot be used; the message says why and what to do."""


# "*** START OF THE PROJECT GUTENBERG EBOOK X ***", "***START OF THIS PROJECT GUTENBERG EBOOK",
# "*** START OF THE PROJECT GUTENBERG E-TEXT" … across the vintages of the Gutenberg files.
_START = re.compile(
    r"^[ \t]*\*{3}[ \t]*START OF (?:THE |THIS )?PROJECT GUTENBERG E-?(?:BOOK|TEXT).*$",
    re.IGNORECASE | re.MULTILINE,
)
_END = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*END OF (?:THE |THIS )?PROJECT GUTENBERG E-?(?:BOOK|TEXT)"
    r"|End of (?:the )?Project Gutenberg(?:'s)? ).*$",
    re.IGNORECASE | re.MULTILINE,
)


def read_text(path: str | Path) -> str:
    """Decode a file as UTF-8 (BOM dropped) with newlines normalised to LF."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"corpus not found: {path} (give a path to a UTF-8 text file or a URL)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"{path} is not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} "
            "(convert it, e.g. `iconv -f latin1 -t utf-8`)"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def strip_gutenberg(text: str) -> str:
    """Keep only the book between the Gutenberg START and END marker lines, if there are any."""
    start = _START.search(text)
    if start:
        text = text[start.end() :]
    end = _END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip("\n") + "\n" if (start or end) else text


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """Split by position: the first (1 - val_fraction) trains, the rest is held out.

    Never a random split: overlapping windows from one text would leak into validation.
    """
    if not 0.0 < val_fraction < 1.0:
        raise CorpusError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    cut = int(round(len(text) * (1.0 - val_fraction)))
    train, val = text[:cut], text[cut:]
    if len(train) < 2 or len(val) < 2:
        raise CorpusError(
            f"corpus of {len(text)} characters is too short to split with val_fraction={val_fraction}"
        )
    return train, val


def corpus_files(sources: Iterable[str | Path]) -> list[Path]:
    """Each source as files: a file as itself, a directory as its *.txt files in name order."""
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            found = sorted(p for p in source.glob("*.txt") if p.is_file())
            if not found:
                raise CorpusError(f"corpus directory {source} has no *.txt files")
            files += found
        else:
            files.append(source)
    return files


def load_corpus(path: str | Path, strip: bool = True, quotes: str = "keep") -> str:
    """Read, optionally strip (header, footer, italics markers) and curl quotes, and check that there
    is something to learn."""
    text = read_text(path)
    if strip:
        text = strip_italics(strip_gutenberg(text))
    text = normalize(text, quotes)
    if not text.strip():
        raise CorpusError(f"corpus {path} is empty (after removing the Gutenberg header/footer)")
    if len(set(text)) < 2:
        raise CorpusError(f"corpus {path} has only one distinct character; nothing to learn")
    return text
