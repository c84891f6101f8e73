"""Constrained decode: what a mask costs. The shipped model generates 500 characters, free and under a
regex that never ends early (lower-case words and spaces), one request and then 64 at once; the
same run measures both and prints their ratio (medians of --repeats).

Then what drawing a `choice` whole costs (charlm/choice.py scores every choice before the first
character, on the engine's worker): three names, and the largest list accepted (7 choices of 512
characters), against one 512-character prefill chunk, the unit of work the worker interleaves."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch

from benchmarks.common import MODEL, median
from charlm.checkpoint import Checkpoint, load_checkpoint
from charlm.choice import choice_logprobs
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


def timed_ms(run: Callable[[], object], repeats: int) -> float:
    runs = []
    for _ in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        run()
        runs.append((time.perf_counter() - start) * 1e3)
    return median(runs[1:])


def choice_costs(ckpt: Checkpoint, repeats: int) -> None:
    text = ("The engineer and the sailor walked along the shore of the island, and the reporter wrote. " * 50)
    with torch.inference_mode():
        logits, (h, c), _ = ckpt.model(ckpt.vocab.encode("The island ")[None])
        state, first = (h[:, 0], c[:, 0]), logits[0, -1]
        chunk = ckpt.vocab.encode(text[:512])[None]
        chunk_ms = timed_ms(lambda: ckpt.model(chunk, (h, c)), repeats)
        print(f"one prefill chunk of 512 characters: {chunk_ms:.1f} ms")
        for name, choices in (("3 names", ["Cyrus Harding", "Pencroft", "Gideon Spilett"]),
                              ("7 choices of 512 characters", [text[k * 9 : k * 9 + 512] for k in range(7)])):
            compiled = compile_constraint(Constraint.of("choice", choices), ckpt.vocab.chars)
            ms = timed_ms(partial(choice_logprobs, ckpt.model, state, first, compiled), repeats)
            print(f"choice draw, {name}: {ms:.1f} ms = {ms / chunk_ms:.2f}x a prefill chunk")


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
    choice_costs(ckpt, args.repeats)


if __name__ == "__main__":
    main()
