"""A server-wide bound on the log-probabilities held for responses not yet sent.

Each log-probability a response carries is a Python object in the engine until the client has read it;
a client that asks for many and never reads would otherwise hold them for as long as it keeps the
connection. A request takes its share before it is queued (refused with 429 when the server already
holds its limit) and gives it back when its response is sent or its client has gone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from dataclasses import dataclass

# A release of at least this many values hands the freed memory back to the system (see _trim).
TRIM_AFTER = 65_536


class BudgetExhausted(RuntimeError):
    """The server holds its limit of log-probabilities for unread responses; retry shortly."""


@dataclass
class Lease:
    """One request's share; `release` is idempotent, so every exit path may call it."""

    budget: LogprobBudget
    values: int
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.budget.held -= self.values
            if self.values >= TRIM_AFTER:
                _trim_soon()


@dataclass
class LogprobBudget:
    """Used only from the event loop, so it needs no lock."""

    limit: int
    held: int = 0

    def take(self, values: int) -> Lease:
        if values and self.held + values > self.limit:
            raise BudgetExhausted(
                f"the server holds {self.held:,} log-probabilities for responses not yet read and this request "
                f"needs {values:,} (limit {self.limit:,}); retry shortly, or ask for fewer"
            )
        self.held += values
        return Lease(self, values)


def _load_libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_LIBC = _load_libc()


_trimming = threading.Lock()


def _trim_soon() -> None:
    """glibc keeps freed memory for reuse; after a large response has gone, give it back
    (malloc_trim), so a replica's resident set falls again instead of staying at its peak. On a
    thread of its own: a trim walks the heap, which is no work for the event loop, and one running
    trim is enough for any number of releases."""
    if getattr(_LIBC, "malloc_trim", None) is not None and not _trimming.locked():
        threading.Thread(target=_trim, name="charlm-trim", daemon=True).start()


def _trim() -> None:
    if _trimming.acquire(blocking=False):
        try:
            _LIBC.malloc_trim(0)  # type: ignore[union-attr]
        finally:
            _trimming.release()
