"""The scheduler: one worker thread that runs the engines of every loaded model.

Each turn it picks one engine with work and runs one iteration of it (admit and prefill a budget of
waiting work, then one batched decode step). The engine picked is the one that has used the least
worker time so far (each engine's time is charged as it runs), so models share the CPU fairly
however different their steps cost: a 64-row step of a large model and a 1-row step of a small one
each pay for what they take. An engine that comes back to work after being idle starts `BURST`
seconds behind the busiest one rather than with the credit of its idle time, so it cannot starve
the others by having saved up, yet a short request to an idle model runs at once, mostly unshared.

One engine alone runs exactly as it would on a thread of its own. Engines never share rows, so a
model's text never depends on what else runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from charlm.request import EngineClosedError, GenerationFailed

__all__ = ["BURST", "Schedulable", "Scheduler"]

log = logging.getLogger("charlm")

# Seconds of worker time a model that just got work may run ahead of the others that were busy: a
# short request to a model that was idle (200 characters of the default model take ~60 ms) runs at
# once, while a model that stays busy gets its fair share and no more.
BURST = 0.1


class Schedulable(Protocol):
    """What the scheduler needs of an engine."""

    def has_work(self) -> bool: ...

    def run_once(self) -> None:
        """One iteration: admit and prefill, then one decode step."""

    def end_all(self, error: BaseException) -> None:
        """Finish every request the engine still holds with `error` (it is leaving, or failed)."""


@dataclass
class _Slot:
    engine: Schedulable
    used: float = 0.0  # worker seconds charged to this engine (its virtual time)
    busy: bool = False  # had work at the last look
    leaving: threading.Event | None = None  # set by remove(); the worker sets it once the engine is out


class Scheduler:
    """Runs engines' iterations on one worker thread, fairly by worker time (see the module's doc)."""

    def __init__(self, name: str = "charlm-engine", clock: Callable[[], float] = time.perf_counter):
        """`clock` charges each engine its worker time (tests give one that counts work, not seconds)."""
        self._clock = clock
        self._slots: list[_Slot] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)  # started by the first add

    def add(self, engine: Schedulable) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self._slots.append(_Slot(engine))
            if not self._thread.is_alive():
                self._thread.start()
            self._cond.notify()

    def wake(self) -> None:
        """An engine got work: let the worker look again."""
        with self._cond:
            self._cond.notify()

    def remove(self, engine: Schedulable, timeout: float = 10.0) -> None:
        """Take `engine` out: the worker ends what it still holds with EngineClosedError and runs it
        no more. Returns once that is done (or the worker is gone)."""
        with self._cond:
            slot = next((s for s in self._slots if s.engine is engine), None)
            if slot is None:
                return
            slot.leaving = threading.Event()
            self._cond.notify()
        if self._thread.is_alive():
            slot.leaving.wait(timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread.ident is not None:
            self._thread.join(timeout=10.0)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        with torch.inference_mode():
            while (turn := self._next()) is not None:
                slot, leaving = turn
                if leaving:
                    self._let_go(slot)
                    continue
                started = self._clock()
                try:
                    slot.engine.run_once()
                except Exception as exc:  # the engine's own guards failed: end its work, keep the others
                    log.exception("engine iteration failed")
                    slot.engine.end_all(GenerationFailed(f"the engine failed: {exc}"))
                slot.used += self._clock() - started

    def _next(self) -> tuple[_Slot, bool] | None:
        """The engine to let go (asked to leave, or all once closed) or to run next, waiting while
        none has work; None once closed and empty."""
        with self._cond:
            while True:
                leaving = [s for s in self._slots if s.leaving is not None or self._closed]
                if leaving:
                    self._slots.remove(leaving[0])
                    return leaving[0], True
                if self._closed:
                    return None
                busy = self._busy_slots()
                if busy:
                    return min(busy, key=lambda s: s.used), False
                self._cond.wait()

    def _busy_slots(self) -> list[_Slot]:
        """The engines with work; one that just got some is placed BURST behind the busy ones."""
        busy = [s for s in self._slots if s.engine.has_work()]
        floor = min((s.used for s in busy if s.busy), default=None)
        for s in self._slots:
            woke = s in busy and not s.busy
            if woke and floor is not None:
                s.used = max(s.used, floor - BURST)
            s.busy = s in busy
        return busy

    @staticmethod
    def _let_go(slot: _Slot) -> None:
        """End the work of an engine taken out of the rotation (outside the lock: ending a request
        takes the engine's own lock, which is held while waking this one)."""
        slot.engine.end_all(EngineClosedError("the engine shut down before this request finished"))
        if slot.leaving is not None:
            slot.leaving.set()
