"""Reading an input file a user named: a crash while parsing it is that file's fault, reported in one line.

Below everything that reads files (corpora, checkpoints, training state) and the command line; it imports
nothing from charlm, so reading a corpus never pulls in the engine or PyTorch through it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["LOAD_FAILURES", "one_line", "input_errors"]

LOAD_FAILURES: tuple[type[BaseException], ...] = (
    RecursionError, TypeError, MemoryError, RuntimeError, ArithmeticError, LookupError,
)
"""What parsers and tensor code raise on a hostile or damaged file (deeply nested JSON, a config of the
wrong type, a tensor too large to allocate). Caught only around reading an input file, where they mean
"this file is bad" rather than "this program has a bug". KeyboardInterrupt is never among them. Moving
what was read onto a device stays outside: a CUDA out-of-memory error there is not a damaged file."""


def one_line(exc: BaseException) -> str:
    """The message on one line (a multi-line message would break `cmd 2> log; tail -1 log` and log parsers);
    the exception's type when it has no message (e.g. a bare MemoryError)."""
    text = re.sub(r"\s*[\r\n]+\s*", " ", str(exc)).strip()
    return text or type(exc).__name__


@contextmanager
def input_errors(error: type[Exception], path: str | Path, what: str) -> Iterator[None]:
    """Re-raise LOAD_FAILURES from reading the input file `path` as `error` naming the file, so a damaged
    file ends in one line that says which file and what to do, never a traceback."""
    try:
        yield
    except LOAD_FAILURES as exc:
        raise error(
            f"cannot read {what} {path}: {type(exc).__name__}: {one_line(exc)} "
            f"(the file is damaged or not a {what}; replace it or point to another one)"
        ) from exc
