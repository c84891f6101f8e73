"""Training speed: the textbook recipe vs charlm's trainer, same model size, same run.

Both train Embedding(256) → LSTM(512) → Linear with batch 64 on this machine's CPU. The seed
recipe draws a shuffled batch of 40-character windows and loops over characters in Python; ours
runs whole windows through nn.LSTM with state carried across them. Prints characters/s, the
ratio, and the ceiling this machine's matrix-multiply rate puts on any recipe for this model.

With `--ranks N` it measures data-parallel training instead: `charlm train` under torchrun with
N processes against one process, the same global batch, the threads per process stated.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import ROOT, corpus_text, matmul_gflops, median
from benchmarks.seed_recipe import NotebookRNN, notebook_loader, notebook_train_step
from charlm.train import train
from charlm.train_config import TrainConfig
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


# The model and batch of both measurements: the default width in one layer, 64 streams of 128 characters.
MODEL_FLAGS = ["--embed", "256", "--hidden", "512", "--layers", "1", "--dropout", "0", "--batch-size", "64",
               "--seq-len", "128", "--precision", "fp32", "--device", "cpu"]


def torchrun_chars_per_s(corpus: Path, processes: int, threads: int, steps: int) -> float:
    """`torchrun -m charlm train` with `processes` x `threads`: the median of rank 0's per-step rate
    (all ranks' characters over rank 0's wall clock), warm-up steps left out."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m.safetensors"
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", str(processes),
               "-m", "charlm", "train", "--corpus", str(corpus), "--out", str(out), "--steps", str(steps),
               "--eval-interval", str(steps), "--log-interval", "1", *MODEL_FLAGS]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows = [json.loads(line) for line in out.with_suffix(".metrics.jsonl").read_text().splitlines()]
    return median([r["chars_per_s"] for r in rows if "chars_per_s" in r][2:])


def ranks_main(ranks: int, steps: int, repeats: int) -> None:
    cores = os.cpu_count() or 1
    layouts = [(1, cores), (1, max(1, cores // ranks)), (ranks, max(1, cores // ranks))]
    print(f"torch {torch.__version__}, {cores} cores; 1x512 LSTM, 64 streams x 128 chars split across the "
          f"processes, {steps} steps per run")
    rates: dict[tuple[int, int], list[float]] = {layout: [] for layout in layouts}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(corpus_text()[:400_000])  # the one held-out pass at the end is not timed; keep it short
        for i in range(repeats):
            for layout in layouts:
                rates[layout].append(torchrun_chars_per_s(corpus, *layout, steps))
            print(f"repeat {i + 1}: " + ", ".join(f"{p} process(es) x {t} thread(s) {rates[(p, t)][-1]:,.0f} chars/s"
                                                 for p, t in layouts), flush=True)
    base = median(rates[layouts[0]])
    for p, t in layouts:
        print(f"median: {p} process(es) x {t} thread(s): {median(rates[(p, t)]):,.0f} chars/s "
              f"({median(rates[(p, t)]) / base:.2f}x 1 process x {cores} threads)")


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
    parser.add_argument("--ranks", type=int, help="measure N torchrun processes against one instead")
    args = parser.parse_args()
    if args.ranks:
        return ranks_main(args.ranks, args.steps, args.repeats)
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
