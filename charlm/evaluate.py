"""Held-out bits per character: how well a model predicts a text, each character from all before it."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from charlm.model import CharLSTM, State

__all__ = ["LN2", "evaluate"]

LN2 = math.log(2.0)  # nats per bit


@torch.inference_mode()
def evaluate(model: CharLSTM, ids: torch.Tensor, chunk: int = 8192) -> dict[str, float]:
    """Mean loss over `ids` predicting each character from all before it (one stream, state carried)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    state: State | None = None
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, chunk):
        x = ids[start : start + chunk].to(device)
        y = ids[start + 1 : start + chunk + 1].to(device)
        x = x[: len(y)]
        logits, state, _ = model(x[None], state)
        total += F.cross_entropy(logits[0].float(), y, reduction="sum").item()
        count += len(y)
    model.train(was_training)
    nats = total / max(count, 1)
    return {"nats": nats, "bpc": nats / LN2, "chars": count}
