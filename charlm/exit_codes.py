"""Which errors are the user's to fix (exit 2), which are failures (exit 1), and how each is printed.

The command line promises one line per error and no traceback for anything a user can cause: a bad
option, a missing or damaged file. Errors not listed here are bugs, and keep their traceback.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from charlm.checkpoint import CheckpointError
from charlm.engine import RequestError
from charlm.sampling import InvalidParameter
from charlm.text import CorpusError
from charlm.vocab import UnknownCharactersError

__all__ = ["USAGE_ERRORS", "FAILURES", "LOAD_FAILURES", "exit_code", "one_line", "input_errors"]

USAGE_ERRORS: tuple[type[Exception], ...] = (
    argparse.ArgumentTypeError, UnknownCharactersError, RequestError, InvalidParameter,
)
"""Exit 2: what was asked is invalid (an option, a seed character, a request field, a sampling setting)."""

FAILURES: tuple[type[Exception], ...] = (CheckpointError, CorpusError, OSError, ValueError)
"""Exit 1: what was asked is valid but could not be done (a file missing, damaged or unwritable).
CheckpointError, CorpusError and the trainer's ResumeError are ValueErrors; they are named for the reader."""

LOAD_FAILURES: tuple[type[BaseException], ...] = (
    RecursionError, TypeError, MemoryError, RuntimeError, ArithmeticError, LookupError,
)
"""What parsers and tensor code raise on a hostile or damaged file (deeply nested JSON, a config of the
wrong type, a tensor too large to allocate). Caught only around reading an input file, where they mean
"this file is bad" rather than "this program has a bug". KeyboardInterrupt is never among them."""


def exit_code(exc: BaseException) -> int | None:
    """2 for usage errors, 1 for failures, None for anything else (a bug: let its traceback show)."""
    if isinstance(exc, USAGE_ERRORS):
        return 2
    if isinstance(exc, FAILURES):
        return 1
    return None


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
