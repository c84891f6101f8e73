"""Prepare the shipped model's companions: the training-text word list and the card's figures.

    python scripts/ship_model.py models/mysterious_island.safetensors data/mysterious_island.txt

Writes models/<name>.words.txt (every word of the training split, for the English-words test)
and prints the figures and samples that models/README.md quotes.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from charlm import evaluate_text, generate, load
from charlm.text import load_corpus, split_text

WORD = re.compile(r"[A-Za-z]+")


def main(checkpoint: str, corpus: str) -> None:
    ckpt = load(checkpoint, "cpu")
    train_text, val_text = split_text(load_corpus(corpus, ckpt.train.get("strip_gutenberg", True)),
                                      ckpt.train.get("val_fraction", 0.1))
    words = sorted({w.lower() for w in WORD.findall(train_text)})
    Path(checkpoint).with_suffix(".words.txt").write_text("\n".join(words) + "\n")
    print(json.dumps({"parameters": ckpt.model.num_parameters(), "config": ckpt.config.to_dict(),
                      "val": evaluate_text(ckpt, val_text), "train_summary": ckpt.train}, indent=2))
    for scale in (1.0, 2.0):
        text = generate(ckpt, "The island", length=600, scale_factor=scale, random_seed=1).text
        print(f"\n--- scale_factor {scale}, random_seed 1 ---\n{text}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
