"""Constrained decode: what a mask costs. The shipped model generates 500 characters, free and under a
regex that never ends early (lower-case words and spaces), one request and then 64 at once; the
same run measures both and prints their ratio (medians of --repeats)."""

from __future__ import annotations

import argparse
import time

from benchmarks.common import MODEL, median
from charlm.checkpoint import load_checkpoint
from charlm.constraint import CompiledConstraint, Constraint, compile_constraint
from charlm.engine import Engine
from charlm.request import EngineLimits, GenerationRequest
from charlm.sampling import SamplingParams

LENGTH, PATTERN = 500, "[a-z ]{500}"


def chars_per_s(engine: Engine, n: int, constraint: CompiledConstraint | None, repeats: int) -> float:
    runs = []
    for r in range(repeats):
        start = time.perf_counter()
        gens = engine.submit_many([GenerationRequest("The island ", length=LENGTH, random_seed=r * n + i,
                                                     sampling=SamplingParams(scale_factor=1.5), constraint=constraint)
                                   for i in range(n)])
        chars = sum(len(g.result().generated) for g in gens)
        runs.append(chars / (time.perf_counter() - start))
    return median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default=str(MODEL))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    start = time.perf_counter()
    constraint = compile_constraint(Constraint.of("regex", PATTERN), ckpt.vocab.chars)
    print(f"regex {PATTERN!r}: compiled in {(time.perf_counter() - start) * 1e3:.0f} ms, {constraint.states} states")
    with Engine(ckpt.model, ckpt.vocab, EngineLimits(max_batch=64)) as engine:
        for n in (1, 64):
            free = chars_per_s(engine, n, None, args.repeats)
            masked = chars_per_s(engine, n, constraint, args.repeats)
            print(f"{n:>2} request(s) x {LENGTH} chars: free {free:,.0f} chars/s, constrained {masked:,.0f} chars/s "
                  f"= {masked / free:.2f}x")


if __name__ == "__main__":
    main()
