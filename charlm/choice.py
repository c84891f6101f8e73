"""A `choice` drawn whole: each string with the model's probability of it, normalised over the choices.

Masking character by character would renormalise at every step: among "Rome", "Paris" and "Parma" its
first step weighs the model's "R" against its "P", whatever follows, so an unlikely "Rome" would be
picked as often as a likely "R" makes it. Here each choice is scored whole, from the state the seed
left, and one is drawn; the row then spells it (CompiledConstraint.only).

The score of a choice is the sum, over its characters, of the log-probability the sampler's
distribution gives each one: the model's logits plus the request's `logit_bias`, times its
scale_factor (1/temperature); at 1 with no bias, exactly the model's probability of the string (what
`/score` reports). A choice that another one extends ("Neb" beside "Nebula") also counts the
probability of ending there: of the characters that would leave the list after it, the rule a regex
match that could grow follows (charlm/steering.py constrain). Without it "Neb" would weigh every text
that starts so, "Nebula" included. Greedy decoding (or top_k 1) takes the most likely choice.
Penalties, top_k, top_p and min_p act on characters as they are drawn one by one; a choice is drawn
whole, so they do not change it.

The choices are run as one packed batch through the model (nn.LSTM), each from the seed's state: as
many steps as the longest choice (at most charlm.constraint.MAX_CHOICE_CHARS), over the choices'
characters together (at most MAX_PATTERN_CHARS), which the engine counts against its prefill budget.
It depends only on the request, so a draw is reproducible per random seed and independent of the
batch.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import PackedSequence, pack_sequence

from charlm.constraint import CompiledConstraint
from charlm.model import CharLSTM

__all__ = ["choice_logprobs", "draw_choice"]


@torch.inference_mode()
def choice_logprobs(model: CharLSTM, state: tuple[torch.Tensor, torch.Tensor], first: torch.Tensor,
                    constraint: CompiledConstraint, bias: torch.Tensor | None = None,
                    scale: float = 1.0) -> torch.Tensor:
    """The log-probability (float64) of each of `constraint.choices` after a seed that left the LSTM
    in `state` (h, c: layers x hidden each) with `first` (vocab,) the logits of the next character."""
    assert constraint.choices is not None, "a choice constraint has choices"
    choices, device = constraint.choices, first.device

    def logprobs(z: torch.Tensor) -> torch.Tensor:
        z = z.float() + bias if bias is not None else z.float()
        return torch.log_softmax(z.double() * scale, dim=-1)

    total = logprobs(first)[torch.tensor([c[0] for c in choices], device=device)]
    ends = [constraint.state_after(c) for c in choices]
    # Each element: (input id, the id it predicts or -1 for "ends here", which choice), packed together.
    elements = [[(a, b, k) for a, b in zip(c, c[1:])] + ([(c[-1], -1, k)] if constraint.grows[ends[k]] else [])
                for k, c in enumerate(choices)]
    rows = [torch.tensor(e, device=device) for e in elements if e]
    if not rows:
        return total
    packed = pack_sequence(rows, enforce_sorted=False)
    inputs = PackedSequence(model.embedding(packed.data[:, 0]), packed.batch_sizes, packed.sorted_indices,
                            packed.unsorted_indices)
    h, c = (s[:, None, :].expand(-1, len(rows), -1).contiguous() for s in state)
    out, _ = model.lstm(inputs, (h, c))
    lp = logprobs(model.fc(out.data))
    targets, which = packed.data[:, 1], packed.data[:, 2]
    scores = lp.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    ending = targets < 0
    if bool(ending.any()):  # the probability of a character that continues no choice
        stays = torch.from_numpy(constraint.allowed[ends]).to(device)[which[ending]]
        scores[ending] = torch.logsumexp(lp[ending].masked_fill(stays, float("-inf")), dim=1)
    return total.index_add(0, which, scores)


def draw_choice(logprobs: torch.Tensor, greedy: bool, uniform: float) -> int:
    """The index of the choice drawn with probability proportional to exp(logprobs), by inverse CDF of
    `uniform` in [0, 1) (the request's own stream); greedy: the most likely, the first on a tie."""
    logprobs = logprobs.cpu()
    if greedy:
        return int(logprobs.argmax())
    cdf = torch.softmax(logprobs, dim=0).cumsum(0)
    return min(int(torch.searchsorted(cdf, torch.tensor([uniform * float(cdf[-1])], dtype=cdf.dtype), right=True)[0]),
               len(cdf) - 1)
