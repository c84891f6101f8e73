"""Prepare the shipped model's companions: the training-text word list and the card's figures.

    python scripts/ship_model.py models/mysterious_island.safetensors CORPUS [CORPUS ...]

CORPUS are the run's --corpus arguments (files or directories), read with the checkpoint's own
settings (strip, quotes, val_fraction). Writes models/<name>.words.txt (every word of every
training part, for the English-words test) and prints the figures and samples that
models/README.md quotes: held-out bpc of every corpus, and samples at scale_factor 1 and 2.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from charlm import evaluate_text, generate, load
from charlm.corpora import load_corpora

WORD = re.compile(r"[A-Za-z]+")


def main(checkpoint: str, corpora: list[str]) -> None:
    ckpt = load(checkpoint, "cpu")
    data = load_corpora(corpora, ckpt.train.get("val_fraction", 0.1), ckpt.train.get("strip_gutenberg", True),
                        ckpt.train.get("quotes", "keep"))
    words = sorted({w.lower() for c in data.corpora for w in WORD.findall(c.train)})
    Path(checkpoint).with_suffix(".words.txt").write_text("\n".join(words) + "\n")
    held_out = {c.name: evaluate_text(ckpt, c.val) for c in data.corpora}
    print(json.dumps({"parameters": ckpt.model.num_parameters(), "config": ckpt.config.to_dict(),
                      "val": held_out, "train_summary": ckpt.train}, indent=2, ensure_ascii=False))
    for scale in (1.0, 2.0):
        text = generate(ckpt, "The island", length=600, scale_factor=scale, random_seed=1).text
        print(f"\n--- scale_factor {scale}, random_seed 1 ---\n{text}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
