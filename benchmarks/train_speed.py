"""Training speed: the textbook recipe vs charlm's trainer, same model size, same run.

Both train Embedding(256) → LSTM(512) → Linear with batch 64 on this machine's CPU. The seed
recipe draws a shuffled batch of 40-character windows and loops over characters in Python; ours
runs whole windows through nn.LSTM with state carried across them. Prints characters/s, the
ratio, and the ceiling this machine's matrix-multiply rate puts on any recipe for this model.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import corpus_text, matmul_gflops, median
from benchmarks.seed_recipe import NotebookRNN, notebook_loader, notebook_train_step
from charlm.train import TrainConfig, train
from charlm.vocab import Vocab


def seed_recipe_chars_per_s(text: str, seconds: float) -> float:
    vocab = Vocab.from_text(text)
    model = NotebookRNN(len(vocab), 256, 512)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.005)
    loss_fn = torch.nn.CrossEntropyLoss()
    loader = iter(notebook_loader(vocab.encode(text)))
    model.train()
    notebook_train_step(model, optimizer, loss_fn, *next(loader))  # warm-up
    chars, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        seq, target = next(loader)
        notebook_train_step(model, optimizer, loss_fn, seq, target)
        chars += seq.numel()
    return chars / (time.perf_counter() - start)


def charlm_chars_per_s(text: str, steps: int) -> float:
    """Our real training loop (train()), timed by its own per-step clock over `steps` steps."""
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(text[:400_000])  # the held-out pass at the end is not timed; keep it short
        out = Path(tmp) / "m.safetensors"
        cfg = TrainConfig(corpus=str(corpus), out=str(out), embed=256, hidden=512, layers=1, dropout=0.0,
                          batch_size=64, seq_len=128, steps=steps, eval_interval=10**9, log_interval=1,
                          device="cpu")
        rows: list[dict] = []
        train(cfg, rows.append)
    per_step = [r["chars_per_s"] for r in rows if "chars_per_s" in r][2:]  # skip warm-up steps
    return median(per_step)


def train_flops_per_char(vocab_size: int, embed: int = 256, hidden: int = 512) -> int:
    """Forward multiply-adds x2 (input and hidden projections, output layer), and x3 for training:
    the backward pass costs about twice the forward (gradients for inputs and for weights)."""
    forward_macs = (embed + hidden) * 4 * hidden + hidden * vocab_size
    return 3 * 2 * forward_macs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=30.0, help="seed recipe time per repeat")
    parser.add_argument("--steps", type=int, default=20, help="charlm steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    text = corpus_text()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, corpus {len(text):,} chars")
    seeds, ours = [], []
    for i in range(args.repeats):
        seeds.append(seed_recipe_chars_per_s(text, args.seconds))
        ours.append(charlm_chars_per_s(text, args.steps))
        print(f"repeat {i + 1}: seed recipe {seeds[-1]:,.0f} chars/s, charlm {ours[-1]:,.0f} chars/s, "
              f"ratio {ours[-1] / seeds[-1]:.2f}x", flush=True)
    print(f"median: seed recipe {median(seeds):,.0f} chars/s | charlm {median(ours):,.0f} chars/s | "
          f"ratio {median(ours) / median(seeds):.2f}x (target >= 4x)")
    rate, flops = matmul_gflops(), train_flops_per_char(len(Vocab.from_text(text)))
    limit = rate * 1e9 / flops
    print(f"physical: training {flops / 1e6:.1f} MFLOP/char; measured matmul {rate:.1f} GFLOP/s -> limit "
          f"{limit:,.0f} chars/s = {limit / median(seeds):.1f}x the seed recipe at 100 % of that rate; "
          f"charlm reaches {median(ours) / limit:.0%} of it")


if __name__ == "__main__":
    main()
