"""Which errors are the user's to fix (exit 2), which are failures (exit 1).

The command line promises one line per error (charlm.inputs.one_line) and no traceback for anything a
user can cause: a bad option, a missing or damaged file. Errors not listed here are bugs, and keep their
traceback.
"""

from __future__ import annotations

import argparse

from charlm.checkpoint import CheckpointError
from charlm.formats import UnsupportedISA
from charlm.sampling import InvalidParameter
from charlm.text import CorpusError
from charlm.vocab import UnknownCharactersError

__all__ = ["USAGE_ERRORS", "FAILURES", "exit_code"]

USAGE_ERRORS: tuple[type[Exception], ...] = (argparse.ArgumentTypeError, UnknownCharactersError, InvalidParameter,
                                              UnsupportedISA)
"""Exit 2: what was asked is invalid (an option, a seed character, a sampling setting, a request field: the
engine's RequestError is an InvalidParameter, so this module needs no engine)."""

FAILURES: tuple[type[Exception], ...] = (CheckpointError, CorpusError, OSError, ValueError)
"""Exit 1: what was asked is valid but could not be done (a file missing, damaged or unwritable).
CheckpointError, CorpusError and the trainer's ResumeError are ValueErrors; they are named for the reader."""


def exit_code(exc: BaseException) -> int | None:
    """2 for usage errors, 1 for failures, None for anything else (a bug: let its traceback show)."""
    if isinstance(exc, USAGE_ERRORS):
        return 2
    if isinstance(exc, FAILURES):
        return 1
    return None
