"""Held-out evaluation speed: the per-tail loop training used vs evaluate_many, same model, same run.

Training evaluates every corpus's held-out tail. The old loop ran each tail as one stream through
evaluate() (a matrix-vector product per character and layer); evaluate_many runs the tails side by
side as the rows of one batch, each with its own state. Both give each tail's bpc; this prints the
median seconds of each over the repeats, their ratio and the largest bpc difference between them.
Training now also evaluates every corpus only every `eval_all_every`-th time, the selected one (the
last tail) alone otherwise: the last line is the mean cost of an evaluation under that rule, against
the old loop's.

By default the eleven tails are pieces of data/mysterious_island.txt (in the repository) with the
sizes of the shelf's held-out tails (the last 10 % of each of the ten Verne novels and of #1268: see
models/README.md), scored by models/mysterious_island.safetensors. `--corpus` takes the real corpora
instead, as `charlm train --corpus` does (directories stand for their *.txt files).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import torch

from benchmarks.common import MODEL, corpus_text, median
from charlm.checkpoint import load_checkpoint
from charlm.corpora import load_corpora
from charlm.evaluate import evaluate, evaluate_many
from charlm.model import CharLSTM
from charlm.train_config import TrainConfig
from charlm.vocab import Vocab

# Characters in each held-out tail of the shelf the shipped model was trained on (10 % of each text).
SHELF_TAILS = [37_087, 59_205, 58_987, 54_101, 48_697, 90_364, 53_528, 29_733, 24_264, 54_766, 111_228]


def repository_tails(vocab: Vocab) -> list[torch.Tensor]:
    """Consecutive pieces of the repository's corpus, one per shelf tail size: realistic lengths from a
    fresh clone. The text is long enough for all eleven (about 622,000 characters)."""
    ids = vocab.encode(corpus_text())
    tails, start = [], 0
    for size in SHELF_TAILS:
        tails.append(ids[start : start + size])
        start += size
    if start > len(ids):
        raise SystemExit(f"the corpus has {len(ids):,} characters, fewer than the {start:,} the tails need")
    return tails


def corpus_tails(sources: list[str], vocab: Vocab, val_fraction: float) -> list[torch.Tensor]:
    """The held-out tails of real corpora, typography as the shipped model's (curly quotes); characters the
    model does not know are dropped (this measures speed, and compares two ways to the same figures)."""
    data = load_corpora(sources, val_fraction, quotes="curly")
    known = set(vocab.chars)
    return [vocab.encode("".join(ch for ch in c.val if ch in known)) for c in data.corpora]


def timed(run: Callable[[], list[dict[str, float]]]) -> tuple[float, list[float]]:
    start = time.perf_counter()
    figures = run()
    return time.perf_counter() - start, [f["bpc"] for f in figures]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=MODEL)
    parser.add_argument("--corpus", action="append", help="a corpus (file or directory of *.txt) whose held-out "
                        "tail to use instead of the repository's pieces; repeat it for several")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-all-every", type=int, default=_default_eval_all_every(),
                        help="training's rule for the last line (default: TrainConfig's, %(default)s)")
    args = parser.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    model: CharLSTM = ckpt.model
    tails = corpus_tails(args.corpus, ckpt.vocab, args.val_fraction) if args.corpus else repository_tails(ckpt.vocab)
    config = ckpt.config
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.checkpoint.name}: {config.layers} x "
          f"{config.hidden} LSTM, vocabulary {config.vocab_size}; {len(tails)} tails, "
          f"{sum(len(t) for t in tails):,} characters (longest {max(len(t) for t in tails):,})")
    loops, batches, selected, worst = [], [], [], 0.0
    for i in range(args.repeats):
        loop_s, loop_bpc = timed(lambda: [evaluate(model, ids) for ids in tails])
        many_s, many_bpc = timed(lambda: evaluate_many(model, tails))
        alone_s, alone_bpc = timed(lambda: evaluate_many(model, tails[-1:]))
        loops.append(loop_s)
        batches.append(many_s)
        selected.append(alone_s)
        worst = max([worst, abs(alone_bpc[0] - loop_bpc[-1]), *(abs(a - b) for a, b in zip(loop_bpc, many_bpc))])
        print(f"repeat {i + 1}: per-tail loop {loop_s:.1f} s, evaluate_many {many_s:.1f} s (ratio "
              f"{loop_s / many_s:.2f}x), the selected tail alone {alone_s:.1f} s", flush=True)
    print(f"median: per-tail loop {median(loops):.1f} s | evaluate_many {median(batches):.1f} s | "
          f"ratio {median(loops) / median(batches):.2f}x | max |bpc difference| {worst:.2e} (target <= 1e-6)")
    n = args.eval_all_every
    mean = (median(batches) + (n - 1) * median(selected)) / n
    print(f"per evaluation in training, every corpus every {n}th time and the selected one otherwise: "
          f"{mean:.1f} s against {median(loops):.1f} s, ratio {median(loops) / mean:.2f}x (target >= 4x)")


def _default_eval_all_every() -> int:
    return int(next(f.default for f in fields(TrainConfig) if f.name == "eval_all_every"))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
