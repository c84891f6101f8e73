"""Log-probabilities → per-character entries: the character's own log-probability and its most likely
alternatives, for generations that ask (`logprobs`) and for scored texts.

The alternatives come from a stable sort, so ties go to the lowest id, as they do in sampling. The
engine decides which rows asked; everything here is computation on the rows it hands over.
"""

from __future__ import annotations

from array import array

import torch

from charlm.request import CharLogprob

__all__ = ["char_logprobs", "sampled_logprobs", "scored_logprobs"]


def char_logprobs(logp: torch.Tensor, chosen: list[int], tops: list[int], chars: tuple[str, ...]) -> list[CharLogprob]:
    """Row r of `logp` (rows, vocab; log-probabilities) as the CharLogprob of character chosen[r], with
    its tops[r] most likely alternatives (a stable sort: ties go to the lowest id, as in sampling)."""
    picked = logp.gather(1, torch.tensor(chosen, device=logp.device)[:, None])[:, 0].tolist()
    k = max(tops, default=0)
    if not k:
        return [CharLogprob(chars[c], lp) for c, lp in zip(chosen, picked)]
    values, ids = logp.sort(dim=1, descending=True, stable=True)
    top_values, top_ids = values[:, :k].tolist(), ids[:, :k].tolist()
    return [
        CharLogprob(chars[c], lp, "".join(chars[t] for t in t_ids[:kr]), array("d", t_vals[:kr]))
        for c, lp, kr, t_ids, t_vals in zip(chosen, picked, tops, top_ids, top_values)
    ]


def sampled_logprobs(logits: torch.Tensor, rows: list[int], chosen: list[int], tops: list[int],
                     chars: tuple[str, ...]) -> list[CharLogprob]:
    """The entries of rows `rows` of a step's `logits` (batch, vocab): for each, the character chosen
    from it and its tops most likely alternatives (chosen and tops in the order of `rows`).

    Only those rows are softmaxed (in float64) and sorted, so rows that did not ask cost nothing here."""
    index = torch.tensor(rows, device=logits.device)
    logp = logits.index_select(0, index).double().log_softmax(-1)  # a copy: the native buffer is reused
    return char_logprobs(logp, chosen, tops, chars)


def scored_logprobs(logits: torch.Tensor, targets: list[int], top_k: int, chars: tuple[str, ...]) -> list[CharLogprob]:
    """The entries of a scored text's characters `targets`, each predicted by the row of `logits`
    (characters, vocab) at the position before it, with the top_k most likely alternatives."""
    logp = logits.double().log_softmax(-1)
    return char_logprobs(logp, targets, [top_k] * len(targets), chars)
