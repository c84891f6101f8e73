"""Handles: a submitted job as its caller sees it, the bridge between the engine's worker thread and
the caller (a thread or an asyncio event loop).

The worker finishes a handle and pushes a generation's characters into it without ever blocking; the
caller waits, iterates or cancels, and an asyncio caller is woken on its own loop only when there is
news for it (the finish, or a chunk for an `async for` reader).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

from charlm.request import (
    CharLogprob,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    ScoreRequest,
    ScoreResult,
)

__all__ = ["Handle", "Generation", "Scoring", "running_loop"]

R = TypeVar("R")


class Handle(Generic[R]):
    """A submitted job as its caller sees it: wait for the outcome, or cancel.

    Usable from threads (`handle.result()`) and from asyncio (`await handle.wait()`); the worker thread
    finishes it, and consumers never block the worker.
    """

    def __init__(
        self,
        timeout: float | None,
        loop: asyncio.AbstractEventLoop | None,
        withdraw: Callable[[Handle[Any]], None] | None = None,
    ):
        self.submitted = time.perf_counter()
        self.deadline = self.submitted + timeout if timeout else None
        self.finished_at: float | None = None
        self._result: R | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._cond = threading.Condition()
        self._cancelled = False
        self._loop = loop
        self._async_event = asyncio.Event() if loop else None
        self._wake_pending = False  # a wakeup is scheduled on the consumer's loop and not yet seen
        self._withdraw = withdraw  # takes a cancelled request out of the waiting queue at once
        self._on_finish: Callable[[], None] | None = None  # the engine counts what is still unfinished

    # --- producer side (worker thread) ---
    def _notify(self, wake_loop: bool = True) -> None:
        with self._cond:
            self._cond.notify_all()
        if wake_loop and self._loop and self._async_event and not self._wake_pending:
            self._wake_pending = True  # one wakeup until the consumer looks again, however many chunks
            try:
                self._loop.call_soon_threadsafe(self._async_event.set)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
                pass

    def _finish(self, result: R | None, error: BaseException | None = None) -> None:
        if self._done.is_set():  # a job ends once
            return
        self._result, self._error = result, error
        self.finished_at = time.perf_counter()
        self._done.set()
        if self._on_finish is not None:
            self._on_finish()
        self._notify()

    # --- consumer side ---
    def cancel(self) -> None:
        """Drop this request: a queued one leaves the queue now (its place is free for the next
        request); a running one frees its row at the worker's next step."""
        if self._cancelled or self._done.is_set():
            return
        self._cancelled = True
        if self._withdraw is not None:
            self._withdraw(self)

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def ended_early(self) -> FinishReason | None:
        """'cancelled' or 'timeout' once the request must stop before its end, else None."""
        if self._cancelled:
            return "cancelled"
        if self.deadline and time.perf_counter() > self.deadline:
            return "timeout"
        return None

    def done(self) -> bool:
        return self._done.is_set()

    def _outcome(self) -> R:
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def result(self, timeout: float | None = None) -> R:
        if not self._done.wait(timeout):
            raise TimeoutError("the request did not finish in time")
        return self._outcome()

    async def wait(self) -> R:
        """The result, once done; woken only by the finish, not by every character."""
        assert self._async_event is not None, "submit from the event loop to consume asynchronously"
        while not self._done.is_set():
            self._rearm()
            if not self._done.is_set():
                await self._async_event.wait()
        return self._outcome()

    def _rearm(self) -> None:
        """Before looking for news and then waiting: the next chunk or the finish wakes us again."""
        assert self._async_event is not None
        self._wake_pending = False
        self._async_event.clear()


class Generation(Handle[GenerationResult]):
    """A handle on one generation request: iterate characters, wait for the result, or cancel.

    Usable from threads (`for ch in gen`, `gen.result()`) and from asyncio (`async for`, `await
    gen.wait()`); the worker thread pushes events, consumers never block the worker.
    """

    def __init__(
        self,
        request: GenerationRequest,
        random_seed: int,
        loop: asyncio.AbstractEventLoop | None,
        withdraw: Callable[[Handle[Any]], None] | None = None,
    ):
        super().__init__(request.timeout, loop, withdraw)
        self.request = request
        self.random_seed = random_seed
        self.first_char_at: float | None = None
        self._chunks: collections.deque[str] = collections.deque()
        # With `request.logprobs`: one CharLogprob per character handed out so far, in order; each is
        # added before its character, so a consumer that has read n characters finds n entries here.
        self.logprobs: list[CharLogprob] = []
        self._streaming = False  # an `async for` consumer has started: wake its loop for chunks

    # --- producer side (worker thread) ---
    def _emit(self, text: str, logprobs: Sequence[CharLogprob] = ()) -> None:
        if text:
            if self.first_char_at is None:
                self.first_char_at = time.perf_counter()
            if logprobs:
                self.logprobs.extend(logprobs)
            self._chunks.append(text)
            # Waking an event loop costs a syscall and a task switch: only for `async for` consumers.
            self._notify(wake_loop=self._streaming)

    # --- consumer side ---
    def __iter__(self) -> Iterator[str]:
        while True:
            with self._cond:
                while not self._chunks and not self._done.is_set():
                    self._cond.wait()
            while self._chunks:
                yield self._chunks.popleft()
            if self._done.is_set() and not self._chunks:
                return

    async def __aiter__(self) -> AsyncIterator[str]:
        assert self._async_event is not None, "submit from the event loop to consume asynchronously"
        self._streaming = True  # before looking at the chunks, so no chunk can go unannounced
        while True:
            if self._chunks:  # whatever came in since the last look, as one piece: a slow reader
                parts = []  # gets fewer, longer events instead of falling further behind
                while self._chunks:
                    parts.append(self._chunks.popleft())
                yield "".join(parts)
                continue
            if self._done.is_set():
                if self._chunks:
                    continue
                return
            self._rearm()
            if self._chunks or self._done.is_set():
                continue
            await self._async_event.wait()


class Scoring(Handle[ScoreResult]):
    """A handle on one scoring job: wait for its ScoreResult (or ScoringStopped), or cancel it."""

    def __init__(
        self,
        request: ScoreRequest,
        loop: asyncio.AbstractEventLoop | None,
        withdraw: Callable[[Handle[Any]], None] | None = None,
    ):
        super().__init__(request.timeout, loop, withdraw)
        self.request = request


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The caller's event loop, to wake it from the worker; None for a caller outside asyncio."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
