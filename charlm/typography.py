"""Typography normalisation: one spelling per symbol, the target book's.

A character model spends capacity on every distinction it sees. The training shelf (Project
Gutenberg plain texts) writes straight quotes `"` `'` and marks italics as `_word_`; the target book,
The Mysterious Island (Gutenberg #1268), writes typographic quotes “ ” ‘ ’ and no italic markers.
Left alone, the model would learn two spellings of every quotation and an underscore the target
never uses, so the shelf is rewritten in #1268's typography before training.

Quotes are curled by context, one character for one, so positions in the text do not move:
an apostrophe (don't, o'clock, 'tis, the sailors' boat, '98) is ’; a quote opening after the start
of the text, whitespace, an opening bracket, a dash or another opening quote, and followed by what
can start a quotation, is “ or ‘; every other quote closes (” or ’).
"""

from __future__ import annotations

import re

__all__ = ["QUOTE_STYLES", "curl_quotes", "normalize", "strip_italics"]

QUOTE_STYLES = ("keep", "curly")

# Each pattern starts with the quote or marker itself (the regex engine then skips to it at C speed)
# and looks back past it (`(?<!…')`) at what precedes it.

# Elisions whose leading apostrophe looks like an opening quote: 'tis, 'twas, 'em, 'bout, 'Change
# (the Exchange, after "on"), '98 (a year; not '17 June, a quoted date), and 's after a dash or an
# italic marker (M----'s, _Dobryna_'s).
_ELISION = re.compile(
    r"'(?:(?<![\w']')(?=(?:tis|twas|twere|twill|twould|twixt|em|bout|cause|neath|gainst|(?:fr|c)isco)\b)"
    r"|(?<![\w']')(?-i:(?=un\b))"
    r"|(?<=\b[Oo][Nn]\s')(?=change\b)"
    r"|(?<![\w']')(?=\d\d\b)(?!\d\d\s+[A-Z][a-z])"
    r"|(?<=[^\s\"'(\[{“‘]')(?=s\b))",
    re.IGNORECASE,
)
# A run of straight quotes that opens: after start/whitespace/bracket/dash/opening quote or an opening
# italic marker (` _"Tu`, not `_word_"`), and followed by something a quotation can start with (not
# space, not closing punctuation).
_OPENING = re.compile(
    r"""["'](?:(?<![^\s(\[{“‘—]["'])|(?<=--["'])|(?<=(?<![^\s(\[{“‘—])_["']))["']*(?=[^\s,.;:!?)\]}"'])"""
)
_OPEN = str.maketrans({'"': "“", "'": "‘"})

# _italic_ or _an italic phrase_, at most one line break inside; not snake_case, not ____.
_ITALIC = re.compile(r"_(?<![\w_]_)(?=[^\s_])([^_\n]*(?:\n[^_\n]*)?(?<=[^\s_]))_(?![\w_])")


def curl_quotes(text: str) -> str:
    """Straight quotes to typographic ones by context; the length of the text is unchanged."""
    text = _ELISION.sub("’", text)
    text = _OPENING.sub(lambda match: match.group().translate(_OPEN), text)
    return text.replace('"', "”").replace("'", "’")


def strip_italics(text: str) -> str:
    """Drop the `_` markers around italic words or phrases (`_mon ami_` -> `mon ami`)."""
    return _ITALIC.sub(r"\1", text)


def normalize(text: str, quotes: str = "keep") -> str:
    """Apply the quote style: "keep" leaves the text as it is, "curly" curls straight quotes."""
    if quotes not in QUOTE_STYLES:
        raise ValueError(f"quotes must be one of {', '.join(QUOTE_STYLES)}; got {quotes!r}")
    return curl_quotes(text) if quotes == "curly" else text
