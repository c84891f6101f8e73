"""The compiled decode kernels: built by the install, rows independent of each other, PyTorch's math."""

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from charlm import native
from charlm.sampling import sample_rows


@pytest.fixture(scope="module")
def kernels() -> native.Kernels:
    loaded = native.load()
    assert loaded is not None, "charlm._native was not built: is there a C compiler? (pip install -e . builds it)"
    return loaded


SHAPES = [(2048, 1024), (2048, 512), (79, 512), (40, 24), (5, 3)]  # (outputs, inputs): tails of every size


@pytest.mark.parametrize("outputs, inputs", SHAPES)
def test_each_row_of_a_product_is_the_same_alone_or_among_others(
    kernels: native.Kernels, outputs: int, inputs: int
) -> None:
    gen = torch.Generator().manual_seed(outputs + inputs)
    weight, bias = torch.randn(outputs, inputs, generator=gen) * 0.05, torch.randn(outputs, generator=gen)
    packed = native.pack(weight, bias)
    x = torch.randn(64, inputs, generator=gen)
    full = kernels.linear(packed, x)
    assert torch.allclose(full, x @ weight.t() + bias, atol=1e-4)
    for rows in (1, 2, 3, 4, 5, 7, 9, 63):  # every blocking of rows: alone, in fours, with a remainder
        assert torch.equal(kernels.linear(packed, x[:rows]), full[:rows]), rows
        assert torch.equal(kernels.linear(packed, x[rows : rows + 1]), full[rows : rows + 1]), rows
    assert torch.equal(kernels.linear(native.pack(weight), x) + bias, full)  # the bias is added last


def test_linear_with_two_inputs_equals_their_concatenation(kernels: native.Kernels) -> None:
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 40, generator=gen), torch.randn(96, generator=gen)
    x, x2 = torch.randn(3, 25, generator=gen), torch.randn(3, 15, generator=gen)
    packed = native.pack(weight, bias)
    assert torch.equal(kernels.linear(packed, x, x2), kernels.linear(packed, torch.cat([x, x2], 1)))
    with pytest.raises(ValueError, match="expected 40 columns, got 25"):
        kernels.linear(packed, x)


def test_linear_adds_the_table_row_each_row_names(kernels: native.Kernels) -> None:
    gen = torch.Generator().manual_seed(1)
    weight, table = torch.randn(48, 16, generator=gen), torch.randn(10, 48, generator=gen)
    x, ids = torch.randn(4, 16, generator=gen), torch.tensor([3, 0, 9, 3])
    got = kernels.linear(native.pack(weight), x, addend=table, add_rows=ids)
    assert torch.equal(got, kernels.linear(native.pack(weight), x) + table[ids])


@contextmanager
def running(kernels: native.Kernels, isa: str) -> Iterator[None]:
    """Force one code path for the block (the machine must have it), then go back to the best."""
    kernels.use(isa)
    try:
        yield
    finally:
        kernels.use("auto")


def int8_reference(packed: native.Packed, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What the int8 kernels must give, bit for bit, written with PyTorch: each row's inputs rounded to
    int8 by its own scale, the weights by each output row's, exact integer sums (float64 holds them),
    then the kernels' float epilogue."""
    most = x.abs().amax(dim=1, keepdim=True)
    inv = torch.where(most > 0, torch.tensor(127.0) / most, torch.tensor(0.0))
    q = (x * inv).round().clamp(-127, 127)
    assert packed.scale is not None
    scale = packed.scale[: packed.outputs]
    wq = torch.where(scale[:, None] > 0, weight / scale.clamp_min(1e-38)[:, None], 0.0).round().clamp(-127, 127)
    sums = (q.double() @ wq.double().t()).float()  # exact: every partial sum is an integer below 2**31
    y = sums * ((most / 127.0) * scale[None, :])
    return y + packed.bias if packed.bias is not None else y


@pytest.mark.parametrize("fmt", native.WEIGHT_FORMATS)
@pytest.mark.parametrize("outputs, inputs", SHAPES)
def test_every_code_path_gives_the_same_bits_in_every_format(
    kernels: native.Kernels, fmt: native.WeightFormat, outputs: int, inputs: int
) -> None:
    gen = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(outputs, inputs, generator=gen) * 0.1, torch.randn(outputs, generator=gen)
    packed = native.pack(weight, bias, fmt)
    x = torch.randn(9, inputs, generator=gen)
    results = {}
    for isa in kernels.available():
        with running(kernels, isa):
            full = kernels.linear(packed, x)
            for rows in (1, 2, 3, 5):  # alone, in a block, with a remainder: the same bits
                assert torch.equal(kernels.linear(packed, x[:rows]), full[:rows]), (isa, rows)
                assert torch.equal(kernels.linear(packed, x[rows : rows + 1]), full[rows : rows + 1]), (isa, rows)
            results[isa] = full
    assert len(results) >= 2, "only the portable code runs here"
    first = next(iter(results.values()))
    for isa, full in results.items():
        assert torch.equal(full, first), isa
    if fmt == "bf16":  # the fp32 arithmetic on the rounded weights
        assert torch.equal(first, kernels.linear(native.pack(weight.bfloat16().float(), bias), x))
    if fmt == "int8":
        assert torch.equal(first, int8_reference(packed, weight, x))
    exact = x.double() @ weight.double().t() + bias.double()
    error = float((first.double() - exact).norm() / exact.norm())  # relative: rounding the inputs is all it costs
    assert error < {"fp32": 1e-6, "bf16": 0.01, "int8": 0.02}[fmt], error


def test_a_code_path_the_cpu_lacks_is_refused_naming_what_it_lacks(kernels: native.Kernels,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native.Kernels, "cpu_features", property(lambda self: {"avx2", "fma"}))  # an AVX2 CPU
    with pytest.raises(native.UnsupportedISA, match=r"avx512 kernels need avx512f, avx512bw, avx512_vnni.*"
                                                      r"can run portable, avx2"):
        kernels.use("avx512")
    with pytest.raises(native.UnsupportedISA, match="unknown kernel path 'neon'"):
        kernels.use("neon")


def test_int8_and_bf16_refuse_weights_they_cannot_hold() -> None:
    weight = torch.randn(32, 64) * 0.1
    weight[5, 3] = 1e30  # one weight that dwarfs its row: int8 would round the rest of the row to 0
    with pytest.raises(native.WeightsError, match=r"layer X row 5: int8 rounding would zero 98% of its weights"):
        native.pack(weight, None, "int8", "layer X")
    native.pack(weight, None, "bf16")  # bf16 keeps 8 exponent bits: it holds this
    weight[5, 3] = 3.4e38  # rounds past bf16's largest value
    with pytest.raises(native.WeightsError, match="beyond bf16's range"):
        native.pack(weight, None, "bf16")
    weight[5, 3] = float("nan")
    for fmt in ("bf16", "int8"):
        with pytest.raises(native.WeightsError, match="NaN or infinite"):
            native.pack(weight, None, fmt)


def reference_cell(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    i, f, o, g = gates.double().chunk(4, 1)
    c_new = f.sigmoid() * c.double() + i.sigmoid() * g.tanh()
    return c_new, o.sigmoid() * c_new.tanh()


@pytest.mark.parametrize("hidden", [512, 48, 13])
def test_lstm_cell_matches_the_lstm_equations(kernels: native.Kernels, hidden: int) -> None:
    gen = torch.Generator().manual_seed(hidden)
    gates = torch.randn(5, 4 * hidden, generator=gen) * 4
    gates[0, :8] = torch.tensor([-200.0, 200.0, -89.0, 89.0, 0.0, 1e-8, -1e-8, 30.0])  # saturation, no NaN
    c0 = torch.randn(5, hidden, generator=gen) * 3
    c, h = c0.clone(), torch.empty(5, hidden)
    kernels.lstm_cell(gates, c, h)
    c_ref, h_ref = reference_cell(gates, c0)
    assert torch.allclose(c.double(), c_ref, atol=1e-6, rtol=1e-6)
    assert torch.allclose(h.double(), h_ref, atol=1e-6)
    for isa in kernels.available():
        c2, h2 = c0.clone(), torch.empty(5, hidden)
        with running(kernels, isa):
            kernels.lstm_cell(gates, c2, h2)
        assert torch.equal(c2, c) and torch.equal(h2, h), isa


def test_sampler_draws_what_sample_rows_draws(kernels: native.Kernels) -> None:
    gen = torch.Generator().manual_seed(3)
    n, vocab = 3000, 79
    logits = torch.randn(n, vocab, generator=gen) * 3
    logits[:100, 5] = logits[:100, 6]  # ties break by id in both
    scale = torch.rand(n, generator=gen) * 2 + 0.2
    top_k = torch.randint(1, vocab + 1, (n,), generator=gen)
    top_p = torch.rand(n, generator=gen) * 1.3
    top_p[top_p > 1] = 2.0
    u = torch.rand(n, dtype=torch.float64, generator=gen)
    min_p = torch.where(torch.rand(n, generator=gen) < 0.5, torch.rand(n, generator=gen).double() * 0.5, 0.0)
    expected = sample_rows(logits, scale, top_k, top_p, u, min_p)
    out = torch.empty(n, dtype=torch.long)
    got = kernels.sample(logits, scale.tolist(), top_k.tolist(), top_p.tolist(), min_p.tolist(), u.tolist(), out)
    assert torch.equal(got, expected)
    firsts = kernels.sample(logits[:1].expand(200, -1).contiguous(), [1.0] * 200, [3] * 200, [2.0] * 200,
                            [0.0] * 200, torch.rand(200, generator=gen).tolist(), out)
    assert set(firsts.tolist()) == set(torch.topk(logits[0], 3).indices.tolist())
    probs = torch.softmax(logits[0].double(), 0)
    kept = kernels.sample(logits[:1].expand(500, -1).contiguous(), [1.0] * 500, [vocab] * 500, [2.0] * 500,
                          [0.3] * 500, torch.rand(500, generator=gen).tolist(), out)
    assert set(kept.tolist()) == set(torch.nonzero(probs >= 0.3 * probs.max()).flatten().tolist())  # min_p


def test_greedy_rows_take_the_argmax_with_ties_to_the_lowest_id(kernels: native.Kernels) -> None:
    gen = torch.Generator().manual_seed(4)
    n, vocab = 500, 79
    logits = torch.randn(n, vocab, generator=gen) * 3
    logits[:50, 7] = logits[:50, 40] = logits[:50].max(1).values + 1  # a tie for the top: id 7 wins
    logits[50:60, 3] = -0.0  # -0 and +0 are equal, as they are for the sort
    logits[50:60, 2] = 0.0
    logits[50:60, 4:] = -1.0
    logits[50:60, :2] = -1.0
    greedy = torch.rand(n, generator=gen) < 0.5  # greedy rows among sampled ones
    top_k = torch.where(greedy, 1, vocab)
    scale = torch.where(greedy, 1.0, torch.rand(n, generator=gen) + 0.5)
    top_p = torch.full((n,), 2.0)
    u = torch.rand(n, dtype=torch.float64, generator=gen)
    out = torch.empty(n, dtype=torch.long)
    zeros = [0.0] * n
    got = kernels.sample(logits, scale.tolist(), top_k.tolist(), top_p.tolist(), zeros, u.tolist(), out).clone()
    assert torch.equal(got, sample_rows(logits, scale, top_k, top_p, u))  # the same ids as the PyTorch sampler
    assert torch.equal(got[greedy], logits[greedy].argmax(1))
    assert set(got[:50][greedy[:50]].tolist()) <= {7}
    assert set(got[50:60][greedy[50:60]].tolist()) <= {2}
    other_u = torch.rand(n, dtype=torch.float64, generator=gen)
    again = kernels.sample(logits, scale.tolist(), top_k.tolist(), top_p.tolist(), zeros, other_u.tolist(), out)
    assert torch.equal(again[greedy], got[greedy])  # the uniform plays no part in a greedy row
