"""How well does charlm.typography write the shelf the way The Mysterious Island (#1268) is written?

    python scripts/typography_report.py [data/mysterious_island.txt] [SHELF_FOLDER]

1. Round trip on #1268: flatten its “ ” ‘ ’ to straight quotes, curl them back with curl_quotes, and
   count, at every quote position, how many come back exactly as #1268 has them.
2. The shelf (when its folder is given): how many straight quotes and `_italic_` markers each book
   has, and how many remain after normalize(quotes="curly") and strip_italics (no straight quote
   should remain), with the time.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from charlm.text import read_text, strip_gutenberg
from charlm.typography import curl_quotes, normalize, strip_italics

FLAT = str.maketrans({"“": '"', "”": '"', "‘": "'", "’": "'"})
KINDS = {"double": "“”", "single": "‘’", "all": "“”‘’"}
MARKER = re.compile(r"(?<![\w_])_(?=[^\s_])|(?<=[^\s_])_(?![\w_])")  # a `_` that opens or closes italics


def round_trip(book: Path, show: int = 10) -> None:
    original = strip_gutenberg(read_text(book))
    flat = original.translate(FLAT)
    start = time.perf_counter()
    curled = curl_quotes(flat)
    seconds = time.perf_counter() - start
    assert len(curled) == len(original), "curl_quotes changed the length of the text"
    print(f"#1268 round trip: {book} ({len(original):,} characters, curl_quotes {seconds * 1000:.1f} ms)")
    for kind, marks in KINDS.items():
        positions = [i for i, char in enumerate(original) if char in marks]
        same = sum(curled[i] == original[i] for i in positions)
        print(f"  {kind:6} quotes: {len(positions):5}  restored exactly: {same:5}  ({same / len(positions):.2%})")
    wrong = [i for i, char in enumerate(original) if char in KINDS["all"] and curled[i] != char]
    for i in wrong[:show]:
        print(f"    at {i}: #1268 {original[i]} got {curled[i]}: {original[max(0, i - 30) : i + 20]!r}")


def row(name: str, cells: Sequence[object]) -> str:
    """A table row: three counts before, then three after normalisation."""
    before = " ".join(f"{cell!s:>6}" for cell in cells[:3])
    after = " ".join(f"{cell!s:>6}" for cell in cells[3:])
    return f"  {name:10} {before} |  {after}"


def shelf(folder: Path) -> None:
    books = sorted(folder.glob("*.txt"))
    texts = [strip_gutenberg(read_text(path)) for path in books]
    print(f"\nshelf: {folder} ({len(books)} books, {sum(map(len, texts)):,} characters)")
    print("  " + " " * 10 + "   straight quotes, italic markers | remaining after normalize + strip_italics")
    print(row("book", ['"', "'", "_"] * 2))
    totals = [0] * 6
    elapsed = 0.0
    for path, text in zip(books, texts):
        start = time.perf_counter()
        done = strip_italics(normalize(text, quotes="curly"))
        elapsed += time.perf_counter() - start
        counts = [text.count('"'), text.count("'"), len(MARKER.findall(text))]
        counts += [done.count('"'), done.count("'"), len(MARKER.findall(done))]
        totals = [a + b for a, b in zip(totals, counts)]
        print(row(path.name, counts))
    print(row("total", totals))
    print(f"  normalize(quotes='curly') + strip_italics on the whole shelf: {elapsed * 1000:.0f} ms")


def main(argv: list[str]) -> None:
    root = Path(__file__).resolve().parents[1]  # defaults work from any directory
    round_trip(Path(argv[0]) if argv else root / "data" / "mysterious_island.txt")
    if len(argv) > 1:  # the folder of the shelf's books (see models/README.md for the ten used)
        shelf(Path(argv[1]))


if __name__ == "__main__":
    main(sys.argv[1:])
