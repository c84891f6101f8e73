"""A request's logit bias, penalties and constraint: the logits of its row changed before sampling.

Applied in this order, each to the row's logits as the model gave them: `logit_bias` (added), then
vLLM's `repetition_penalty` (over the seed's and the generated characters: a positive logit divided
by it, a negative one multiplied), then OpenAI's presence and frequency penalties (over the
generated characters: logit -= frequency x count + presence x (count > 0)), then the constraint's
mask (charlm/constraint.py: only characters that can still lead to a complete match). The samplers
then scale, filter (top_k, top_p, min_p) and draw (charlm/sampling.py). Each row's arithmetic is its
own, elementwise in float32, so a request's text stays independent of the batch. Characters are
tokens here, so a frequency penalty counts letters: it pushes down `e` and the space first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from charlm.constraint import CompiledConstraint
from charlm.sampling import SamplingParams

__all__ = ["Steering", "constrain"]


class Steering:
    """One row's bias vector and the counts its penalties need, updated with each sampled character."""

    def __init__(self, params: SamplingParams, vocab_size: int, seed_ids: torch.Tensor):
        """`seed_ids` on the device of the logits this row will change (its vectors live there too)."""
        device = seed_ids.device
        self.bias: torch.Tensor | None = None
        if params.logit_bias:
            self.bias = torch.zeros(vocab_size)
            for token, value in params.logit_bias:
                self.bias[token] = value
            self.bias = self.bias.to(device)
        self.presence, self.frequency = params.presence_penalty, params.frequency_penalty
        self.repetition = params.repetition_penalty
        self.counts = torch.zeros(vocab_size, device=device) if self.presence or self.frequency else None
        self.seen: torch.Tensor | None = None
        if self.repetition != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[seed_ids] = True

    def apply(self, z: torch.Tensor) -> None:
        """Change one row's logits (vocab,) in place."""
        if self.bias is not None:
            z += self.bias
        if self.seen is not None:
            penalized = torch.where(z > 0, z / self.repetition, z * self.repetition)
            torch.where(self.seen, penalized, z, out=z)
        if self.counts is not None:
            z -= self.counts * self.frequency + (self.counts > 0).float() * self.presence

    def update(self, token: int) -> None:
        """Count a character the row has just sampled."""
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True


def constrain(constraint: CompiledConstraint, state: int, z: torch.Tensor, scale: float, greedy: bool,
              draw: Callable[[], float]) -> bool:
    """Keep only the characters of `z` (one row's logits, changed in place) that continue `constraint`
    from `state`; return True when the text ends here instead. At a complete match that can grow it
    ends with the probability the model gives to the characters that would leave the language (a
    uniform from `draw`, the request's own stream; greedy: when its top character would leave)."""
    allowed = torch.from_numpy(constraint.allowed[state]).to(z.device)
    if constraint.accepting[state]:
        if not constraint.grows[state]:
            return True
        if greedy:
            ends = not bool(allowed[int(z.argmax())])
        else:
            probs = torch.softmax(z.double() * scale, dim=0)
            ends = draw() < float(probs[~allowed].sum())
        if ends:
            return True  # what is sampled now is not used
    z.masked_fill_(~allowed, float("-inf"))
    return False
