"""One scheduler, many engines: fair shares of the worker, and each model's text unchanged by the others."""

from __future__ import annotations

import threading

import pytest

from charlm.checkpoint import Checkpoint
from charlm.engine import Engine
from charlm.model import CharLSTM
from charlm.request import EngineClosedError, EngineLimits, GenerationRequest
from charlm.scheduler import BURST, Scheduler


class FakeClock:
    """Worker time as the fake engines charge it: the schedule depends on the work, not the machine."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeEngine:
    """`turns` iterations of work, each costing `cost` seconds of the fake clock; records the order."""

    def __init__(self, name: str, cost: float, turns: int, clock: FakeClock, log: list[str],
                 done: threading.Event | None = None):
        self.name, self.cost, self.turns, self.clock, self.log, self.done = name, cost, turns, clock, log, done
        self.after: tuple[FakeEngine, int] | None = None  # (engine, turns): have work only once it ran that many

    def has_work(self) -> bool:
        if self.after is not None and self.after[0].log.count(self.after[0].name) < self.after[1]:
            return False
        return self.turns > 0

    def run_once(self) -> None:
        self.clock.now += self.cost
        self.turns -= 1
        self.log.append(self.name)
        if self.turns == 0 and self.done is not None:
            self.done.set()

    def end_all(self, error: BaseException) -> None:
        self.turns = 0


def schedule(costs: dict[str, float], turns: dict[str, int], b_after: int = 0) -> list[str]:
    """The order in which the scheduler runs fake engines A and B (B gets work once A ran b_after times)."""
    clock, log, done = FakeClock(), list[str](), threading.Event()
    engines = {name: FakeEngine(name, costs[name], turns[name], clock, log) for name in costs}
    engines["B"].done = done
    engines["B"].after = (engines["A"], b_after)
    scheduler = Scheduler(clock=clock)
    # Added together under the lock, so the worker's first look sees both.
    with scheduler._cond:
        for engine in engines.values():
            scheduler.add(engine)
    assert done.wait(timeout=60)
    scheduler.close()
    return log


def test_a_light_model_is_not_starved_by_a_busy_one() -> None:
    """A's 64-row steps cost 12x B's one-row steps: B, arriving while A is busy, still gets half the
    worker, and its first BURST seconds at once, so A runs few steps while B's request is served."""
    log = schedule({"A": 0.004, "B": 0.0003}, {"A": 100_000, "B": 200}, b_after=50)
    assert log.count("B") == 200
    first_b, last_b = log.index("B"), len(log) - 1 - log[::-1].index("B")
    a_meanwhile = log[first_b:last_b].count("A")
    # B's 200 steps cost 0.06 s: up to BURST of them at once, the rest in an even share.
    assert a_meanwhile <= max(0.0, 200 * 0.0003 - BURST) / 0.004 + 2, a_meanwhile
    assert first_b == 50  # its first step came as soon as it had work: right after A's current step


def test_a_light_model_that_stays_busy_gets_half_and_no_more() -> None:
    """Once B has used its burst, A and B alternate by time: A is never starved by B's many short steps."""
    log = schedule({"A": 0.004, "B": 0.0003}, {"A": 100_000, "B": 20_000}, b_after=50)
    log = log[log.index("B") : len(log) - log[::-1].index("B")]  # while B had work
    a_time, b_time = log.count("A") * 0.004, log.count("B") * 0.0003
    assert abs(a_time - (b_time - BURST)) <= 0.004 + 1e-9, (a_time, b_time)


def test_two_busy_models_share_the_worker_by_time_not_by_turns() -> None:
    log = schedule({"A": 0.004, "B": 0.001}, {"A": 100_000, "B": 4_000})
    log = log[: len(log) - log[::-1].index("B")]  # up to B's last step (A goes on until the scheduler stops)
    a_time = log.count("A") * 0.004
    b_time = log.count("B") * 0.001
    assert abs(a_time - b_time) <= 0.004 + 1e-9, (a_time, b_time)  # within one of A's steps


def test_each_models_text_is_what_it_gives_alone_whatever_else_runs(tiny: Checkpoint) -> None:
    other = CharLSTM(tiny.model.config)
    other.load_state_dict({k: v * 0.9 for k, v in tiny.model.state_dict().items()})
    requests = [GenerationRequest("The ", length=300, random_seed=s) for s in range(12)]

    def alone(model: CharLSTM) -> list[str]:
        with Engine(model, tiny.vocab, EngineLimits(max_batch=16)) as engine:
            return [engine.generate(r, timeout=60).text for r in requests]

    expected = {"tiny": alone(tiny.model), "other": alone(other)}
    scheduler = Scheduler()
    engines = {name: Engine(model, tiny.vocab, EngineLimits(max_batch=16), scheduler=scheduler)
               for name, model in (("tiny", tiny.model), ("other", other))}
    try:
        gens = {name: e.submit_many(requests) for name, e in engines.items()}  # both at once, interleaved
        for name, handles in gens.items():
            assert [g.result(timeout=60).text for g in handles] == expected[name]
    finally:
        for engine in engines.values():
            engine.close()
        scheduler.close()
    assert expected["tiny"] != expected["other"]


def test_an_engine_leaving_ends_only_its_own_work(tiny: Checkpoint) -> None:
    scheduler = Scheduler()
    limits = EngineLimits(max_batch=4, max_length=100_000)
    staying, leaving = (Engine(tiny.model, tiny.vocab, limits, scheduler=scheduler) for _ in range(2))
    try:
        endless = leaving.submit(GenerationRequest("The ", length=100_000))
        leaving.close(grace=0)
        with pytest.raises(EngineClosedError):
            endless.result(timeout=60)
        assert staying.generate(GenerationRequest("The ", length=50, random_seed=1), timeout=60).finish_reason \
            == "length"
        assert scheduler.alive and leaving.closed
    finally:
        staying.close()
        scheduler.close()
