"""A `choice` drawn whole: each string with the model's probability of it, normalised over the choices.

Masking character by character would renormalise at every step: among "Rome", "Paris" and "Parma" its
first step weighs the model's "R" against its "P", whatever follows, so an unlikely "Rome" would be
picked as often as a likely "R" makes it. Here each choice is scored whole, from the state the seed
left, and one is drawn; the row then spells it (CompiledConstraint.only).

The score of a choice is the sum, over its characters, of the log-probability the sampler's
distribution gives each one: the model's logits plus the request's `logit_bias`, times its
scale_factor (1/temperature); at 1 with no bias, exactly the model's probability of the string (what
`/score` reports). Greedy decoding (or top_k 1) takes the most likely choice. Penalties, top_k, top_p and min_p
act on characters as they are drawn one by one; a choice is drawn whole, so they do not change it.

The choices are run as one packed batch through the model (nn.LSTM), each from the seed's state: as
many steps as the longest choice (at most charlm.constraint.MAX_CHOICE_CHARS), over the choices'
characters together (at most MAX_PATTERN_CHARS). It depends only on the request, so a draw is
reproducible per random seed and independent of the batch.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import PackedSequence, pack_sequence

from charlm.model import CharLSTM

__all__ = ["choice_logprobs", "draw_choice"]


@torch.inference_mode()
def choice_logprobs(model: CharLSTM, state: tuple[torch.Tensor, torch.Tensor], first: torch.Tensor,
                    choices: tuple[tuple[int, ...], ...], bias: torch.Tensor | None = None,
                    scale: float = 1.0) -> torch.Tensor:
    """Each choice's log-probability (float64, one per choice) after a seed that left the LSTM in
    `state` (h, c: layers x hidden each) with `first` (vocab,) the logits of the next character."""

    def logprobs(z: torch.Tensor) -> torch.Tensor:
        z = z.float() + bias if bias is not None else z.float()
        return torch.log_softmax(z.double() * scale, dim=-1)

    device = first.device
    total = logprobs(first)[torch.tensor([c[0] for c in choices], device=device)]
    longer = [k for k, c in enumerate(choices) if len(c) > 1]
    if not longer:
        return total
    # Each element: (input id, the id it predicts, which choice), so one packing keeps them together.
    rows = [torch.tensor([[a, b, k] for a, b in zip(choices[k], choices[k][1:])], device=device) for k in longer]
    packed = pack_sequence(rows, enforce_sorted=False)
    inputs = PackedSequence(model.embedding(packed.data[:, 0]), packed.batch_sizes, packed.sorted_indices,
                            packed.unsorted_indices)
    h, c = (s[:, None, :].expand(-1, len(longer), -1).contiguous() for s in state)
    out, _ = model.lstm(inputs, (h, c))
    scores = logprobs(model.fc(out.data)).gather(1, packed.data[:, 1:2])[:, 0]
    return total.index_add(0, packed.data[:, 2], scores)


def draw_choice(logprobs: torch.Tensor, greedy: bool, uniform: float) -> int:
    """The index of the choice drawn with probability proportional to exp(logprobs), by inverse CDF of
    `uniform` in [0, 1) (the request's own stream); greedy: the most likely, the first on a tie."""
    logprobs = logprobs.cpu()
    if greedy:
        return int(logprobs.argmax())
    cdf = torch.softmax(logprobs, dim=0).cumsum(0)
    return min(int(torch.searchsorted(cdf, torch.tensor([uniform * float(cdf[-1])], dtype=cdf.dtype), right=True)[0]),
               len(cdf) - 1)
