import torch

from charlm.sampling import TOP_P_OFF, SamplingParams, sample_rows

VOCAB = 12


def draw(logits: torch.Tensor, top_k: int = VOCAB, top_p: float = 2.0, n: int = 4000,
         scale: float = 1.0) -> torch.Tensor:
    rows = logits.expand(n, -1)
    return sample_rows(rows, torch.full((n,), scale), torch.full((n,), top_k), torch.full((n,), top_p),
                       torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))


def test_top_k_never_samples_outside_the_k_best() -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(1))
    best3 = set(torch.topk(logits, 3).indices.tolist())
    drawn = set(draw(logits, top_k=3).tolist())
    assert drawn <= best3 and len(drawn) == 3


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02] + [0.0] * (VOCAB - 7)) + 1e-12
    logits = probs.log()
    assert set(draw(logits, top_p=0.65).tolist()) == {0, 1}  # 0.40 + 0.25 reaches 0.65
    assert set(draw(logits, top_p=0.66).tolist()) == {0, 1, 2}  # needs the third
    assert set(draw(logits, top_p=0.3).tolist()) == {0}


def test_sampling_follows_the_scaled_distribution() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0] + [-30.0] * (VOCAB - 3))
    for scale in (0.5, 2.0):
        counts = torch.bincount(draw(logits, n=20000, scale=scale), minlength=VOCAB).double() / 20000
        expected = torch.softmax(logits.double() * scale, 0)
        assert torch.allclose(counts, expected, atol=0.015), (scale, counts[:3], expected[:3])


def test_same_uniforms_same_ids_and_rows_are_independent() -> None:
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(2))
    u = torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    k, p, s = torch.full((5,), VOCAB), torch.full((5,), 2.0), torch.ones(5)
    together = sample_rows(logits, s, k, p, u)
    alone = torch.cat([sample_rows(logits[i : i + 1], s[:1], k[:1], p[:1], u[i : i + 1]) for i in range(5)])
    assert torch.equal(together, alone)


def test_top_k_1_is_argmax_with_ties_to_the_lowest_id_and_no_randomness() -> None:
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(4))
    logits[0, 9] = logits[0, 4] = logits[0].max() + 1  # tied for the top: the lower id wins
    n = logits.size(0)
    ones, off = torch.ones(n, dtype=torch.long), torch.full((n,), 2.0)
    for seed in range(3):
        u = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        picked = sample_rows(logits, torch.ones(n), ones, off, u)
        assert torch.equal(picked, logits.argmax(1)) and int(picked[0]) == 4
        mixed = sample_rows(logits, torch.ones(n), torch.tensor([1, VOCAB, 1, 3, 1, VOCAB]), off, u)
        assert torch.equal(mixed[::2], picked[::2])  # greedy rows are the same among sampled ones


def test_greedy_params_are_top_k_1_at_scale_1_without_top_p() -> None:
    params = SamplingParams(scale_factor=0.3, top_k=7, top_p=0.5, greedy=True)
    assert (params.top_k_for(VOCAB), params.sampler_scale, params.top_p_or_off) == (1, 1.0, TOP_P_OFF)
    plain = SamplingParams(scale_factor=0.3, top_k=7, top_p=0.5)
    assert (plain.top_k_for(VOCAB), plain.sampler_scale, plain.top_p_or_off) == (7, 0.3, 0.5)
