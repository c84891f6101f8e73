"""Data loading: read, normalise, split and encode a shelf of books, as the trainer does.

Prints seconds per stage for every *.txt under the given folders plus the default corpus, and the
encoding stage against a Python loop over characters (what Vocab.encode did before), same run.

    python -m benchmarks.data_loading [FOLDER ...]      (e.g. the folder of the ten Verne novels, see models/README.md)
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import CORPUS, median
from charlm.corpora import load_corpora


def python_loop_encode(index: dict[str, int], text: str) -> torch.Tensor:
    return torch.tensor([index[c] for c in text], dtype=torch.long)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", help="folders of *.txt books, read before the default corpus")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sources = [*args.folders, str(CORPUS)]
    load_s, encode_s, loop_s = [], [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        data = load_corpora(sources, val_fraction=0.1, strip=True, quotes="curly")
        load_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        ids = data.train_ids()
        val = data.val_ids()
        encode_s.append(time.perf_counter() - start)
        index = {c: i for i, c in enumerate(data.vocab.chars)}
        start = time.perf_counter()
        looped = torch.cat([python_loop_encode(index, c.train) for c in data.corpora])
        loop_s.append(time.perf_counter() - start)
        assert torch.equal(ids, looped)
    chars = ids.numel() + sum(v.numel() for v in val)
    print(f"{len(data.corpora)} corpora, {chars:,} characters, vocabulary {len(data.vocab)}")
    print(f"read + strip + curl quotes + split: {median(load_s):.2f} s (median of {args.repeats})")
    print(f"encode (numpy lookup):              {median(encode_s):.2f} s")
    print(f"encode, Python loop (training part): {median(loop_s):.2f} s -> "
          f"{median(loop_s) / median(encode_s):.1f}x slower")
    print(f"total to training tensors:          {median(load_s) + median(encode_s):.2f} s")


if __name__ == "__main__":
    main()
