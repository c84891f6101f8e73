"""Held-out bits per character: how well a model predicts a text, each character from all before it."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from charlm.formats import WeightFormat, WeightsError
from charlm.model import CharLSTM, State

__all__ = ["LN2", "evaluate", "evaluate_decoded", "evaluate_many"]

LN2 = math.log(2.0)  # nats per bit

# evaluate_many's chunk: 11 rows x 1024 characters keep the LSTM's output (hidden 512) and the logits
# near 30 MB. The length hardly matters for speed (256 to 8192 within a few per cent on a CPU): the
# recurrence is paid per character whatever the chunk.
MANY_CHUNK = 1024


def _figures(nats_sum: float, count: int) -> dict[str, float]:
    nats = nats_sum / max(count, 1)
    return {"nats": nats, "bpc": nats / LN2, "chars": count}


@torch.inference_mode()
def evaluate(model: CharLSTM, ids: torch.Tensor, chunk: int = 8192) -> dict[str, float]:
    """Mean loss over `ids` predicting each character from all before it (one stream, state carried).
    The reference for one text (`charlm eval`); evaluate_many gives the same figures for several at once."""
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
    return _figures(total, count)


@torch.inference_mode()
def evaluate_many(model: CharLSTM, tails: list[torch.Tensor], chunk: int = MANY_CHUNK) -> list[dict[str, float]]:
    """evaluate() of each text in `tails`, in its order, with the texts run side by side as the rows of one
    batch: one stream at a time leaves the LSTM a matrix-vector product per character, while rows share
    each step's matrix multiply.

    Each row carries its own state, so its figure is evaluate()'s for that text (to float rounding: the
    batch shape and chunk differ). Rows are sorted longest first and the batch shrinks as texts end, so a
    row is never advanced past its end before its last character is counted; within its last chunk a
    shorter row is padded after its end and the padded positions are not counted. Each chunk's logits are
    reduced to per-row sums at once: memory stays rows x chunk x (hidden + vocab) floats."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counts = [max(len(ids) - 1, 0) for ids in tails]  # characters predicted in each text
    order = sorted(range(len(tails)), key=lambda i: -counts[i])
    totals = torch.zeros(len(tails), dtype=torch.float64, device=device)  # in `order`
    state: State | None = None
    for start in range(0, counts[order[0]] if tails else 0, chunk):
        rows = [i for i in order if counts[i] > start]  # a prefix of `order`: the texts still running
        width = min(chunk, counts[rows[0]] - start)
        x, y = _chunk_batch([tails[i] for i in rows], start, width)
        if state is not None and state[0].shape[1] > len(rows):
            state = (state[0][:, : len(rows)].contiguous(), state[1][:, : len(rows)].contiguous())
        logits, state, _ = model(x.to(device), state)
        y = y.to(device)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="none",
                               ignore_index=-100)
        totals[: len(rows)] += loss.view(len(rows), width).sum(dim=1, dtype=torch.float64)
    model.train(was_training)
    sums = totals.tolist()
    figures: list[dict[str, float]] = [{} for _ in tails]
    for position, i in enumerate(order):
        figures[i] = _figures(sums[position], counts[i])
    return figures


def _chunk_batch(tails: list[torch.Tensor], start: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of positions [start, start + width) of each text, as (rows, width) tensors: a text
    that ends within the chunk is padded after its end, its padded targets -100 (cross_entropy's ignore)."""
    x = torch.zeros((len(tails), width), dtype=torch.long)
    y = torch.full((len(tails), width), -100, dtype=torch.long)
    for row, ids in enumerate(tails):
        n = min(width, len(ids) - 1 - start)
        x[row, :n] = ids[start : start + n]
        y[row, :n] = ids[start + 1 : start + 1 + n]
    return x, y


# Streams a decode-path evaluation splits its text into (rows of one batch), and the characters each
# stream reads before its part, so that its first predictions have context as in one long stream.
DECODED_ROWS = 64
DECODED_WARMUP = 512


@torch.inference_mode()
def evaluate_decoded(model: CharLSTM, ids: torch.Tensor, weights: WeightFormat,
                     rows: int = DECODED_ROWS, warmup: int = DECODED_WARMUP) -> dict[str, float]:
    """Mean loss over `ids` as the server's decode steps predict it, with `weights` in a format of
    charlm.native (fp32, bf16, int8): what a served model's predictions cost in each format.

    The decode step runs one character per row, so the text is split into `rows` contiguous parts
    read as the rows of one batch, each from `warmup` characters before its part (its state starts
    at zero there). The figure is therefore a little above `evaluate`'s one-stream figure; compare
    formats with each other, on the same split (as `charlm eval --weights` does)."""
    from charlm import native  # here: training imports this module, and never needs the kernels
    from charlm.decoder import Decoder

    kernels = native.load()
    if kernels is None:
        raise WeightsError("evaluating the decode path needs the native kernels (charlm._native)")
    decoder = Decoder(model, rows, kernels, weights)
    n = len(ids) - 1  # characters predicted
    size = -(-n // rows)
    starts = torch.arange(rows) * size
    ends = (starts + size).clamp(max=n)
    starts = starts.clamp(max=n)
    feeds = (starts - warmup).clamp(min=0)
    total = torch.zeros((), dtype=torch.float64)
    for t in range(int((ends - feeds).max())):
        pos = feeds + t
        decoder.tokens[:rows] = ids[pos.clamp(max=n - 1)]
        logits = decoder.step(rows).double()
        scored = (pos >= starts) & (pos < ends)
        targets = ids[(pos + 1).clamp(max=n)]
        loss = torch.logsumexp(logits, dim=1) - logits.gather(1, targets[:, None])[:, 0]
        total += loss[scored].sum()
    return _figures(float(total), n)
