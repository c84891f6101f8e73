"""Generation speed: the notebook's sample() loop vs the charlm engine, same model, same run, in each
decode weight format (fp32, bf16, int8: charlm/native.py), on the kernel path asked for (--kernels).

Lines, for each format: one 500-character request (and the same with one thread, since a single row
may not gain from a second one); 64 concurrent 500-character requests, one seed shared by all and
then one seed each (aggregate chars/s and each request's time to first character); and each
format's figures against fp32's, measured in the same run. Once: PyTorch alone (fp32, no native
kernels), and a 10,000-character seed (prefill time; long seeds run nn.LSTM in fp32 whatever the
format, so one line holds for all).

Also the physical limits of each format, each measured here and now (medians of repeated passes):
for 64 rows, the best multiply rate measured, at the decode step's own shapes or on a large square
product: float32 matmul for fp32 and bf16 (the bf16 kernels widen the weights and compute in fp32),
torch._int_mm (int8 x int8 -> int32) for int8. For one row, the rate of reading that format's
decode weights (Decoder.weight_bytes) from where they live: a buffer their size read again and
again, which stays in cache when they fit; and one larger than the last-level cache, from memory.
Each limit is printed with the share of it charlm reaches; a share above 100 % is reported as a
limit measured wrong.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from benchmarks.common import MODEL, cpu_info, matmul_gflops, median
from benchmarks.seed_recipe import NotebookRNN, sample
from charlm import native
from charlm.checkpoint import Checkpoint, load_checkpoint
from charlm.decoder import Decoder
from charlm.engine import Engine
from charlm.model import ModelConfig
from charlm.request import EngineLimits, GenerationRequest
from charlm.sampling import SamplingParams

SEED, LENGTH, SCALE = "The island", 500, 2.0
LIMITS = EngineLimits(max_batch=64, max_seed_chars=10_000)
# The targets for int8, each against fp32 measured in the same run.
INT8_SINGLE_VS_FP32, INT8_BATCH_VS_FP32 = 1.8, 1.5


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


@contextmanager
def threads(n: int) -> Iterator[None]:
    """Run with `n` intra-op threads, then restore. An engine takes the count its worker thread
    starts with, so engines to measure under it are created inside."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class FormatRun:
    """One weight format's figures, from one engine."""

    single: float  # chars/s, one request, default threads
    single_one_thread: float  # the same, one thread
    batch: float  # chars/s aggregate, 64 requests sharing a seed
    weight_bytes: int  # Decoder.weight_bytes: what a decode step reads in this format


def run_format(ckpt: Checkpoint, fmt: native.WeightFormat, base: float, repeats: int,
               fp32: FormatRun | None) -> FormatRun:
    """Measure and print one format's lines; `fp32` (measured earlier in this run) gives the ratios."""
    tag = f"charlm    {fmt}"
    with Engine(ckpt.model, ckpt.vocab, LIMITS, weights=fmt) as engine:
        gc.freeze()  # as the service does once it is ready: no 100 ms full collections mid-run
        single = single_chars_per_s(engine, repeats)
        native_on = "on" if engine.native else "OFF"
        targets = "target >= 10x" + (f"; >= {INT8_SINGLE_VS_FP32}x fp32" if fmt == "int8" else "")
        print(f"{tag}  1 request  x {LENGTH} chars: {single:,.0f} chars/s  = {single / base:.1f}x baseline "
              f"({targets}; native kernels {native_on})")
        runs = [concurrent(engine, 64) for _ in range(repeats)]
        batch = median([r[0] for r in runs])
        targets = "target >= 40x" + (f"; >= {INT8_BATCH_VS_FP32}x fp32" if fmt == "int8" else "")
        print(f"{tag}  64 requests x {LENGTH} chars: {batch:,.0f} chars/s aggregate = {batch / base:.1f}x baseline "
              f"({targets}); time to first char median {median([r[1] for r in runs]):.1f} ms, "
              f"worst {max(r[2] for r in runs):.1f} ms (target < 100 ms; worst of each run "
              f"{' / '.join(f'{r[2]:.0f}' for r in runs)} ms)")
        runs = [concurrent(engine, 64, distinct=True) for _ in range(repeats)]
        print(f"{tag}  64 requests, 64 different seeds: {median([r[0] for r in runs]):,.0f} chars/s aggregate; "
              f"time to first char median {median([r[1] for r in runs]):.1f} ms, worst {max(r[2] for r in runs):.1f} "
              f"ms (worst of each run {' / '.join(f'{r[2]:.0f}' for r in runs)} ms)")
    with threads(1), Engine(ckpt.model, ckpt.vocab, LIMITS, weights=fmt) as engine:
        one_thread = single_chars_per_s(engine, repeats)
    print(f"{tag}  1 request, 1 thread: {one_thread:,.0f} chars/s = {one_thread / single:.2f}x the same with "
          f"{torch.get_num_threads()} threads")
    run = FormatRun(single, one_thread, batch, Decoder(ckpt.model, 1, native.load(), fmt).weight_bytes)
    if fp32 is not None and fmt != "fp32":
        aims = (f" (targets >= {INT8_SINGLE_VS_FP32}x, >= {INT8_BATCH_VS_FP32}x)" if fmt == "int8" else "")
        print(f"{tag}  vs fp32, same run: 1 request {single / fp32.single:.2f}x (1 thread each: "
              f"{one_thread / fp32.single_one_thread:.2f}x), 64 requests {batch / fp32.batch:.2f}x{aims}")
    return run


def decode_flops_per_char(cfg) -> int:  # type: ignore[no-untyped-def]
    """Multiply-adds of one decode step ×2: layer 0 hidden (its input is a table lookup), each
    further layer's input and hidden projections, and the output layer."""
    h = cfg.hidden
    macs = h * 4 * h + (cfg.layers - 1) * 2 * h * 4 * h + h * cfg.vocab_size
    return 2 * macs


def decode_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(inputs, outputs) of each product of one decode step, the order it runs them: layer 0's hidden
    projection, each further layer's input and hidden projections (one product in the kernels, two
    here: the same multiply-adds), the output layer."""
    h = cfg.hidden
    return [(h, 4 * h)] + [(h, 4 * h)] * (2 * (cfg.layers - 1)) + [(h, cfg.vocab_size)]


def ops_rate(products: list[Callable[[], object]], ops: int, repeats: int = 5) -> float:
    """Giga-operations per second of running `products` (`ops` operations, a multiply-add counting
    two, per pass over them): the median of `repeats` timed batches of about 2e9 operations, after
    a pass untimed (oneDNN builds each shape's kernel on its first call)."""
    for product in products:
        product()
    runs = []
    for _ in range(repeats):
        passes = max(1, int(2e9 // ops))
        start = time.perf_counter()
        for _ in range(passes):
            for product in products:
                product()
        runs.append(ops * passes / (time.perf_counter() - start) / 1e9)
    return median(runs)


def decode_matmul_gflops(cfg: ModelConfig, rows: int, repeats: int = 5) -> float:
    """The float32 matrix-multiply rate at the decode step's own shapes: `rows` inputs times each
    layer's weights and the output layer's."""
    pairs = [(torch.randn(rows, k), torch.randn(k, n)) for k, n in decode_shapes(cfg)]
    return ops_rate([partial(torch.matmul, a, b) for a, b in pairs],
                    sum(2 * rows * k * n for k, n in decode_shapes(cfg)), repeats)


def _up8(n: int) -> int:
    return -(-n // 8) * 8


def _int8(rows: int, cols: int) -> torch.Tensor:
    return torch.randint(-127, 128, (rows, cols), dtype=torch.int8)


def int8_mm_gops(shapes: list[tuple[int, int]], rows: int, repeats: int = 5) -> float:
    """torch._int_mm's rate (int8 x int8 -> int32, GOPS, a multiply-add counting two) on `rows`
    inputs times each (inputs, outputs) shape. Every dimension is padded up to a multiple of 8:
    _int_mm wants it (and odd shapes fall off its fast path); the padding is not counted."""
    pairs = [(_int8(_up8(rows), _up8(k)), _int8(_up8(k), _up8(n))) for k, n in shapes]
    return ops_rate([partial(torch._int_mm, a, b) for a, b in pairs],
                    sum(2 * rows * k * n for k, n in shapes), repeats)


def read_gbps(nbytes: int, repeats: int = 5) -> tuple[float, str]:
    """How fast this machine reads `nbytes` that were just read (the median of `repeats` timed
    passes, of at least 256 MB each): a buffer the size of a format's decode weights says how fast a
    one-row step can stream them from wherever they live; one larger than the last-level cache, from
    memory. Returns the fastest rate of the ways tried, and which it was.

    Bytes are bytes whatever the format, but a reduction can be bound by its arithmetic rather than
    by reading (a uint8 sum widens every byte to int64, and runs at a fraction of a GB/s): two
    readers with little work per byte are timed, float32 sum and uint8 max. Each runs on one thread
    and on all: all threads read from every core's cache, but one is what a busy machine still gives
    (a split reduction waits for its slowest thread, a time slice when another process holds a core)."""
    x = torch.ones(max(1, nbytes // 4))
    readers: dict[str, Callable[[], torch.Tensor]] = {"float32 sum": x.sum, "uint8 max": x.view(torch.uint8).amax}
    rates = {}
    for count in sorted({1, torch.get_num_threads()}):
        with threads(count):
            for name, read in readers.items():
                read()
                runs = []
                for _ in range(repeats):
                    n = max(1, (1 << 28) // nbytes)
                    start = time.perf_counter()
                    for _ in range(n):
                        read()
                    runs.append(x.numel() * 4 * n / (time.perf_counter() - start) / 1e9)
                rates[f"{name}, {count} thread{'s' if count > 1 else ''}"] = median(runs)
    best = max(rates, key=rates.__getitem__)
    return rates[best], best


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


def of_limit(figure: float, limit: float) -> str:
    """`figure` as a share of `limit`, said plainly when it is above it: a limit that is exceeded was
    measured wrong (the machine was busier while measuring it), not beaten."""
    share = figure / limit
    return f"{share:.0%}" if share <= 1 else f"{share:.0%} (above 100 %: this limit was measured wrong, rerun)"


def print_batch_limits(cfg: ModelConfig, runs: dict[str, FormatRun]) -> None:
    """64 rows are bound by multiply-adds: the best rate this machine reaches now, at the step's own
    shapes (PyTorch's) or on a large square product, whichever is higher; in fp32 for fp32 and bf16
    (whose kernels widen each weight to fp32 and multiply in fp32), in int8 for int8."""
    flops = decode_flops_per_char(cfg)
    rates = {}
    if {"fp32", "bf16"} & runs.keys():
        rates["fp32"] = ("matmul", "GFLOP/s", decode_matmul_gflops(cfg, 64), matmul_gflops())
    if "int8" in runs:
        rates["int8"] = ("torch._int_mm", "GOPS", int8_mm_gops(decode_shapes(cfg), 64),
                         int8_mm_gops([(2048, 2048)], 2048))
    for fmt, run in runs.items():
        how, unit, shaped, square = rates["int8" if fmt == "int8" else "fp32"]
        limit = max(shaped, square) * 1e9 / flops
        note = " (computes in fp32: fp32's limit)" if fmt == "bf16" else ""
        if fmt == "int8" and "amx_int8" in cpu_info("flags").split():
            note = " (oneDNN runs _int_mm on this CPU's AMX tiles; charlm's int8 kernels use VNNI at most)"
        print(f"physical  64 rows, {fmt}{note}: {how} {shaped:.1f} {unit} at the step's shapes, {square:.1f} on a 2048 "
              f"square -> limit {limit:,.0f} chars/s; charlm reaches {of_limit(run.batch, limit)}")


def print_row_limits(runs: dict[str, FormatRun], base: float) -> None:
    """One row is bound by reading the weights, from wherever they live: the cache when they fit (a
    buffer of their size read again and again), memory when they do not."""
    llc = last_level_cache_bytes()
    memory, memory_reader = read_gbps(4 * llc)
    print("physical  one row reads each decode weight once per character: Decoder.weight_bytes (packed weights with "
          "their padding, biases, int8 scales and column sums; of the embedding table only one row)")
    for fmt, run in runs.items():
        weights = run.weight_bytes
        cached, cached_reader = read_gbps(weights)
        places = ((weights, cached, cached_reader, "a buffer the weights' size"),
                  (4 * llc, memory, memory_reader, f"4 x the {llc >> 20} MiB last-level cache"))
        for nbytes, bandwidth, reader, where in places:
            one_row = bandwidth * 1e9 / weights
            applies = (nbytes == weights) == (weights <= llc)
            fit = "fit in" if weights <= llc else "do not fit in"
            reach = (of_limit(run.single, one_row) if applies
                     else f"{run.single / one_row:.0%}, not this model's limit: its weights {fit} the cache")
            print(f"physical  one row, {fmt}: {weights / 1e6:.1f} MB of weights per character, read at "
                  f"{bandwidth:.1f} GB/s ({where}, {reader}) -> {one_row:,.0f} chars/s = {one_row / base:.1f}x "
                  f"baseline; one request reaches {reach}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(MODEL))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--weights", default=",".join(native.WEIGHT_FORMATS),
                        help="decode weight formats, comma-separated (default: all)")
    parser.add_argument("--kernels", default="auto", choices=["auto", *native.ISAS],
                        help="the native kernels' code path (default: the best this CPU runs)")
    args = parser.parse_args()
    asked = [w.strip() for w in args.weights.split(",") if w.strip()]
    if unknown := [w for w in asked if w not in native.WEIGHT_FORMATS]:
        parser.error(f"unknown weight format {unknown[0]!r}: choose from {', '.join(native.WEIGHT_FORMATS)}")
    formats = sorted(set(asked), key=native.WEIGHT_FORMATS.index)  # fp32 first: the others' ratios need it
    kernels = native.load()
    if kernels is None:
        parser.error("the native kernels are not built (charlm._native): no format can be measured on them")
    try:
        kernels.use(args.kernels)
    except native.UnsupportedISA as e:
        parser.error(str(e))
    ckpt = load_checkpoint(args.checkpoint)
    cfg = ckpt.config
    cpu = cpu_info("model name") or "unknown"
    print(f"model {cfg.layers}x{cfg.hidden} (embed {cfg.embed}), {ckpt.model.num_parameters():,} parameters; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU {cpu}; kernels {kernels.isa} "
          f"(this CPU runs {', '.join(kernels.available())})")

    base = baseline_chars_per_s(ckpt, args.repeats)
    print(f"baseline  notebook sample(), 1 x {LENGTH} chars: {base:,.0f} chars/s")
    with Engine(ckpt.model, ckpt.vocab, LIMITS, use_native=False) as engine:
        torch_only = single_chars_per_s(engine, args.repeats)
    print(f"charlm    1 request, PyTorch only (fp32, no native kernels): {torch_only:,.0f} chars/s  = "
          f"{torch_only / base:.1f}x baseline")
    runs: dict[str, FormatRun] = {}
    for fmt in formats:
        runs[fmt] = run_format(ckpt, fmt, base, args.repeats, runs.get("fp32"))
    with Engine(ckpt.model, ckpt.vocab, LIMITS, weights=formats[0]) as engine:
        long_seed = ("The engineer looked at the sea. " * 400)[:10_000]
        prefill = median([engine.generate(GenerationRequest(long_seed, length=1)).timings.prefill_ms
                          for _ in range(args.repeats)])
    print(f"charlm    10,000-char seed: prefill {prefill:.1f} ms ({10_000 / prefill * 1e3:,.0f} chars/s; nn.LSTM in "
          "fp32 whatever the decode format, so one figure for all)")
    print_batch_limits(cfg, runs)
    print_row_limits(runs, base)


if __name__ == "__main__":
    main()
