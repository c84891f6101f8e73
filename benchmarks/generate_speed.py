"""Generation speed: the notebook's sample() loop vs the charlm engine, same model, same run.

Lines: one 500-character request; 64 concurrent 500-character requests, one seed shared by all
and then one seed each (aggregate chars/s and each request's time to first character); a
10,000-character seed (prefill time). Also the physical limits, each measured here and now (medians
of repeated passes): for 64 rows, the best matrix-multiply rate measured (at the decode step's own
shapes, or on a large square product); for one
row, the rate of reading the decode weights from where they live (a buffer their size read again and
again, which stays in the last-level cache when they fit; and one larger than that cache, from
memory). Each limit is printed with the share of it charlm reaches; a share above 100 % is reported
as a limit measured wrong.
Only fp32 decode weights exist today; each weight format would get its own lines.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

from benchmarks.common import MODEL, matmul_gflops, median
from benchmarks.seed_recipe import NotebookRNN, sample
from charlm.checkpoint import load_checkpoint
from charlm.engine import Engine
from charlm.model import ModelConfig
from charlm.request import EngineLimits, GenerationRequest
from charlm.sampling import SamplingParams

SEED, LENGTH, SCALE = "The island", 500, 2.0


def baseline_chars_per_s(ckpt, repeats: int) -> float:  # type: ignore[no-untyped-def]
    rnn = NotebookRNN.from_charlm(ckpt.model)
    char2int = {c: i for i, c in enumerate(ckpt.vocab.chars)}
    import numpy as np

    char_array = np.array(ckpt.vocab.chars)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        sample(rnn, char2int, char_array, SEED, LENGTH, SCALE)
        runs.append(LENGTH / (time.perf_counter() - start))
    return median(runs)


def single_chars_per_s(engine: Engine, repeats: int) -> float:
    runs = []
    for i in range(repeats):
        start = time.perf_counter()
        engine.generate(GenerationRequest(SEED, length=LENGTH, sampling=SamplingParams(SCALE), random_seed=i))
        runs.append(LENGTH / (time.perf_counter() - start))
    return median(runs)


DISTINCT = ("The engineer looked at the sea, and the settlers walked back to Granite House. " * 2)[:80]


def concurrent(engine: Engine, n: int, distinct: bool = False) -> tuple[float, float, float]:
    """Aggregate chars/s, median and worst time to first character (ms) for n simultaneous requests,
    all seeded with SEED, or each with its own 10-character seed (no shared prefill)."""
    seeds = [DISTINCT[i : i + 10] if distinct else SEED for i in range(n)]
    start = time.perf_counter()
    gens = [engine.submit(GenerationRequest(seeds[i], length=LENGTH, sampling=SamplingParams(SCALE), random_seed=i))
            for i in range(n)]
    results = [g.result() for g in gens]
    wall = time.perf_counter() - start
    ttfc = [(g.first_char_at or 0) - g.submitted for g in gens]
    chars = sum(r.usage.generated_chars for r in results)
    return chars / wall, median(ttfc) * 1e3, max(ttfc) * 1e3


def decode_flops_per_char(cfg) -> int:  # type: ignore[no-untyped-def]
    """Multiply-adds of one decode step ×2: layer 0 hidden (its input is a table lookup), each
    further layer's input and hidden projections, and the output layer."""
    h = cfg.hidden
    macs = h * 4 * h + (cfg.layers - 1) * 2 * h * 4 * h + h * cfg.vocab_size
    return 2 * macs


def read_gbps(nbytes: int, repeats: int = 5) -> float:
    """How fast this machine reads `nbytes` of float32 that were just read (the median of `repeats`
    timed passes): a buffer the size of the decode weights says how fast a one-row step can stream
    them from wherever they live; one larger than the last-level cache, from memory."""
    x = torch.randn(nbytes // 4)
    x.sum()
    runs = []
    for _ in range(repeats):
        n = max(1, (1 << 30) // nbytes)  # about 1 GB read per pass, whatever the size
        start = time.perf_counter()
        for _ in range(n):
            x.sum()
        runs.append(nbytes * n / (time.perf_counter() - start) / 1e9)
    return median(runs)


def last_level_cache_bytes() -> int:
    """The L3 (or largest) cache's size as Linux reports it; 64 MiB where it says nothing."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        text = (index / "size").read_text().strip() if (index / "size").exists() else ""
        if text.endswith("K"):
            sizes.append(int(text[:-1]) * 1024)
        elif text.endswith("M"):
            sizes.append(int(text[:-1]) * 1024 * 1024)
    return max(sizes, default=64 << 20)


def decode_matmul_gflops(cfg: ModelConfig, rows: int, repeats: int = 5) -> float:
    """The matrix-multiply rate at the decode step's own shapes: `rows` inputs times each layer's
    input and hidden weights, and the output layer (the median of `repeats` timed passes)."""
    h = cfg.hidden
    shapes = [(h, 4 * h)] + [(h, 4 * h)] * (2 * (cfg.layers - 1)) + [(h, cfg.vocab_size)]
    pairs = [(torch.randn(rows, k), torch.randn(k, n)) for k, n in shapes]
    flops = sum(2 * rows * k * n for k, n in shapes)
    runs = []
    for _ in range(repeats):
        passes = max(1, int(2e9 // flops))
        start = time.perf_counter()
        for _ in range(passes):
            for a, b in pairs:
                a @ b
        runs.append(flops * passes / (time.perf_counter() - start) / 1e9)
    return median(runs)


def of_limit(figure: float, limit: float) -> str:
    """`figure` as a share of `limit`, said plainly when it is above it: a limit that is exceeded was
    measured wrong (the machine was busier while measuring it), not beaten."""
    share = figure / limit
    return f"{share:.0%}" if share <= 1 else f"{share:.0%} (above 100 %: this limit was measured wrong, rerun)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default=str(MODEL))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    cfg = ckpt.config
    print(f"model {cfg.layers}x{cfg.hidden} (embed {cfg.embed}), {ckpt.model.num_parameters():,} parameters; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    base = baseline_chars_per_s(ckpt, args.repeats)
    print(f"baseline  notebook sample(), 1 x {LENGTH} chars: {base:,.0f} chars/s")
    limits = EngineLimits(max_batch=64, max_seed_chars=10_000)
    with Engine(ckpt.model, ckpt.vocab, limits, use_native=False) as engine:
        torch_only = single_chars_per_s(engine, args.repeats)
    print(f"charlm    1 request, PyTorch only (no native kernels): {torch_only:,.0f} chars/s  = "
          f"{torch_only / base:.1f}x baseline")
    with Engine(ckpt.model, ckpt.vocab, limits) as engine:
        gc.freeze()  # as the service does once it is ready: no 100 ms full collections mid-run
        single = single_chars_per_s(engine, args.repeats)
        print(f"charlm    1 request  x {LENGTH} chars: {single:,.0f} chars/s  = {single / base:.1f}x baseline "
              f"(target >= 10x; native kernels {'on' if engine.native else 'OFF'})")
        runs = [concurrent(engine, 64) for _ in range(args.repeats)]
        agg = median([r[0] for r in runs])
        print(f"charlm    64 requests x {LENGTH} chars: {agg:,.0f} chars/s aggregate = {agg / base:.1f}x baseline "
              f"(target >= 40x); time to first char median {median([r[1] for r in runs]):.1f} ms, "
              f"worst {max(r[2] for r in runs):.1f} ms (target < 100 ms; worst of each run "
              f"{' / '.join(f'{r[2]:.0f}' for r in runs)} ms)")
        runs = [concurrent(engine, 64, distinct=True) for _ in range(args.repeats)]
        agg_distinct, worst = median([r[0] for r in runs]), max(r[2] for r in runs)
        print(f"charlm    64 requests, 64 different seeds: {agg_distinct:,.0f} chars/s aggregate; "
              f"time to first char median {median([r[1] for r in runs]):.1f} ms, worst {worst:.1f} ms "
              f"(worst of each run {' / '.join(f'{r[2]:.0f}' for r in runs)} ms)")
        long_seed = ("The engineer looked at the sea. " * 400)[:10_000]
        prefill = median([engine.generate(GenerationRequest(long_seed, length=1)).timings.prefill_ms
                          for _ in range(args.repeats)])
        print(f"charlm    10,000-char seed: prefill {prefill:.1f} ms ({10_000 / prefill * 1e3:,.0f} chars/s)")
    flops = decode_flops_per_char(cfg)
    weights = flops // 2 * 4  # every multiply-add reads one float32 weight once per character
    # 64 rows are bound by multiply-adds: the best rate this machine reaches now, at the step's own
    # shapes (PyTorch's) or on a large square product, whichever is higher.
    shaped, square = decode_matmul_gflops(cfg, 64), matmul_gflops()
    limit = max(shaped, square) * 1e9 / flops
    print(f"physical  64 rows, fp32: matmul {shaped:.1f} GFLOP/s at the step's shapes, {square:.1f} on a 2048 square "
          f"-> limit {limit:,.0f} chars/s; charlm reaches {of_limit(agg, limit)}")
    # One row is bound by reading the weights, from wherever they live: the last-level cache when they
    # fit (a buffer of their size read again and again), memory when they do not.
    llc = last_level_cache_bytes()
    places = ((weights, "a buffer the weights' size"), (4 * llc, f"4 x the {llc >> 20} MiB last-level cache"))
    for nbytes, where in places:
        bandwidth = read_gbps(nbytes)
        one_row = bandwidth * 1e9 / weights
        applies = (nbytes == weights) == (weights <= llc)
        fit = "fit in" if weights <= llc else "do not fit in"
        reach = (of_limit(single, one_row) if applies
                 else f"{single / one_row:.0%}, not this model's limit: its weights {fit} the cache")
        print(f"physical  one row, fp32: {weights / 1e6:.1f} MB of weights per character, read at {bandwidth:.1f} GB/s "
              f"({where}) -> {one_row:,.0f} chars/s = {one_row / base:.1f}x baseline; one request reaches {reach}")

if __name__ == "__main__":
    main()
