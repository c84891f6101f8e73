"""The batched LSTM step the engine decodes with: weights laid out for one step of many rows.

Every row's arithmetic is the same whatever the number of rows in the step, so a request's text
never depends on who shares its steps: in the native kernels by construction, through PyTorch by
oneDNN's packed weights (CPU) or a fixed step shape (elsewhere).
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from charlm import native
from charlm.model import CharLSTM

__all__ = ["Decoder"]

# oneDNN packs a weight for a batch size it is told; any hint >= 2 gives the same packing, and with
# it every row of a product gets the same bits whatever the number of rows (checked by the tests).
PACK_BATCH_HINT = 64


class _Linear:
    """`x @ weight.T + bias` whose rows do not depend on how many rows are multiplied together.

    On CPU it runs oneDNN with the weight packed once: every row gets the same bits alone or among
    255 others, and small batches run 2-4x faster than through the BLAS PyTorch uses for matmul.
    Elsewhere (CUDA, or a build without oneDNN) the kernel may change with the row count, so
    `row_invariant` is False and the decoder runs every step at its full row count instead.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.row_invariant = weight.device.type == "cpu" and torch.backends.mkldnn.is_available()
        self.bias = bias
        if self.row_invariant:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_BATCH_HINT)
        else:
            self.weight = weight.contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_invariant:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [None], "")
        return torch.nn.functional.linear(x, self.weight, self.bias)


def _gate_order(hidden: int) -> torch.Tensor:
    """Rows of PyTorch's (input, forget, cell, output) gates reordered to (input, forget, output,
    cell): the three sigmoid gates then become one slice, the tanh gate another."""
    i, f, g, o = torch.arange(4 * hidden).split(hidden)
    return torch.cat([i, f, o, g])


class Decoder:
    """LSTM steps for many rows at once, with the weights laid out for it.

    The embedding is folded into layer 0's input projection (a (vocab, 4*hidden) table lookup, the
    two biases summed into it); deeper layers multiply [input, h] by [W_ih, W_hh] in one product.
    Row i of `h`, `c` and `tokens` is one request's state; rows are advanced in contiguous ranges.

    With the native kernels (CPU) a step is a few C calls on raw addresses; each row's arithmetic
    there is the same whatever the number of rows. Without them, PyTorch runs the step (see
    `_Linear` for how rows stay exact there).
    """

    def __init__(self, model: CharLSTM, rows: int, kernels: native.Kernels | None = None,
                 weights: native.WeightFormat = "fp32"):
        """`weights` is the format of the decode weights (native.pack); formats other than fp32 need
        the kernels. Raises native.WeightsError when the weights cannot be held in that format."""
        cfg = model.config
        dev = model.fc.weight.device
        self.layers, self.hidden, self.rows = cfg.layers, cfg.hidden, rows
        order = _gate_order(cfg.hidden).to(dev)
        w = {name: p.detach().float() for name, p in model.lstm.named_parameters()}
        embedding = model.embedding.weight.detach().float()
        table0 = embedding @ w["weight_ih_l0"].t() + w["bias_ih_l0"] + w["bias_hh_l0"]
        self.table0 = table0[:, order].contiguous()
        layers = [(w["weight_hh_l0"][order], None)] + [
            (
                torch.cat([w[f"weight_ih_l{k}"], w[f"weight_hh_l{k}"]], dim=1)[order],
                (w[f"bias_ih_l{k}"] + w[f"bias_hh_l{k}"])[order],
            )
            for k in range(1, cfg.layers)
        ]
        layers.append((model.fc.weight.detach().float(), model.fc.bias.detach().float()))
        self.kernels = kernels if dev.type == "cpu" else None
        self.weights = weights
        self._fp32_bytes = sum(t.numel() * 4 for layer in layers for t in layer if t is not None)
        if weights != "fp32" and (broken := [n for n, p in model.named_parameters() if not p.isfinite().all()]):
            raise native.WeightsError(f"{broken[0]} holds NaN or infinite values: the model cannot be decoded")
        if self.kernels is None and weights != "fp32":
            raise native.WeightsError(f"{weights} decode weights need the native kernels (a CPU device and the "
                                      "compiled extension); this decoder runs PyTorch: use fp32")
        if self.kernels is not None:
            names = [f"LSTM layer {k}" for k in range(cfg.layers)] + ["the output layer"]
            self._packed = [native.pack(weight, bias, weights, name) for (weight, bias), name in zip(layers, names)]
            self._scratch = native.scratch_for(self._packed, rows)
            self._scratch_at = 0 if self._scratch is None else self._scratch.data_ptr()
            self._gates = torch.empty(rows, 4 * cfg.hidden)
            self._logits = torch.empty(rows, cfg.vocab_size)
            self.row_invariant = True
        else:
            linears = [_Linear(weight, bias) for weight, bias in layers]
            self.proj, self.fc = linears[:-1], linears[-1]
            self.row_invariant = self.fc.row_invariant
        self.h = torch.zeros(cfg.layers, rows, cfg.hidden, device=dev)
        self.c = torch.zeros(cfg.layers, rows, cfg.hidden, device=dev)
        self.tokens = torch.zeros(rows, dtype=torch.long, device=dev)

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights one step reads (the embedding table aside: a step reads one row of it)."""
        if self.kernels is not None:
            return sum(p.nbytes for p in self._packed)
        return self._fp32_bytes

    def _advance(self, a: int, b: int) -> None:
        """Feed rows [a, b) their token in `self.tokens`."""
        if self.kernels is not None:
            self._advance_native(a, b)
            return
        hs = self.hidden
        x = self.h[0, a:b]
        for k in range(self.layers):
            h, c = self.h[k, a:b], self.c[k, a:b]
            if k == 0:
                gates = self.proj[0](h).add_(self.table0.index_select(0, self.tokens[a:b]))
            else:
                gates = self.proj[k](torch.cat([x, h], dim=1))
            sig = gates[:, : 3 * hs].sigmoid_()
            g = gates[:, 3 * hs :].tanh_()
            c.mul_(sig[:, hs : 2 * hs]).addcmul_(sig[:, :hs], g)
            torch.mul(sig[:, 2 * hs :], torch.tanh(c), out=h)
            x = h

    def _advance_native(self, a: int, b: int) -> None:
        """`_advance` in C: one product and one cell call per layer."""
        assert self.kernels is not None
        n, hs = b - a, self.hidden
        linear, cell, gates = self.kernels.linear_at, self.kernels.lstm_cell_at, self._gates.data_ptr()
        threads = torch.get_num_threads()  # passed on: OpenMP alone would give this worker every core
        tokens = self.tokens.data_ptr() + a * self.tokens.element_size()
        x = 0
        for k, packed in enumerate(self._packed[:-1]):
            h, c = self._row_address(self.h, k, a), self._row_address(self.c, k, a)
            if k == 0:  # layer 0 adds the table row of each row's token
                linear(n, h, hs, hs, None, 0, 0, packed.address, self.table0.data_ptr(), tokens, gates, 4 * hs,
                       self._scratch_at, threads)  # fmt: skip
            else:
                linear(n, x, hs, hs, h, hs, hs, packed.address, packed.bias_address, None, gates, 4 * hs,
                       self._scratch_at, threads)  # fmt: skip
            cell(n, gates, 4 * hs, c, h, hs, hs, threads)
            x = h

    def _row_address(self, t: torch.Tensor, layer: int, row: int) -> int:
        return t.data_ptr() + (layer * self.rows + row) * self.hidden * t.element_size()

    def _logits_of(self, a: int, b: int) -> torch.Tensor:
        """The output layer on the top layer's h of rows [a, b) (with the native kernels, a view
        of a buffer that the next call overwrites)."""
        if self.kernels is None:
            return self.fc(self.h[-1, a:b])
        fc, hs = self._packed[-1], self.hidden
        self.kernels.linear_at(b - a, self._row_address(self.h, self.layers - 1, a), hs, hs, None, 0, 0, fc.address,
                               fc.bias_address, None, self._logits[a:b].data_ptr(), fc.outputs, self._scratch_at,
                               torch.get_num_threads())  # fmt: skip
        return self._logits[a:b]

    def step(self, n: int) -> torch.Tensor:
        """Advance rows [0, n) by one token; return their logits for the next one."""
        r = n if self.row_invariant else self.rows  # a fixed shape is what keeps rows exact elsewhere
        self._advance(0, r)
        return self._logits_of(0, r)[:n]

    def prefill(self, start: int, seeds: list[torch.Tensor]) -> torch.Tensor:
        """Run `seeds` (longest first) into rows start.. from a zero state, all rows together, one
        character per step; return each row's logits for its first generated character.

        Every row goes through the same arithmetic as a decode step, so its result does not depend
        on which other seeds share the steps. Needs a row-invariant decoder (`row_invariant`).
        """
        ids = pad_sequence(seeds, batch_first=True)  # (rows, longest seed), zeros after each end
        m, longest = ids.shape
        stop = start + m
        self.h[:, start:stop].zero_()
        self.c[:, start:stop].zero_()
        live = m
        for t in range(longest):
            while len(seeds[live - 1]) <= t:  # rows whose seed has ended keep their final state
                live -= 1
            self.tokens[start : start + live].copy_(ids[:live, t])
            self._advance(start, start + live)
        return self._logits_of(start, stop)

    def load_row(self, i: int, h: torch.Tensor, c: torch.Tensor) -> None:
        """Put one request's state, h and c of shape (layers, hidden), into row i."""
        self.h[:, i].copy_(h)
        self.c[:, i].copy_(c)

    def move_row(self, src: int, dst: int) -> None:
        self.h[:, dst].copy_(self.h[:, src])
        self.c[:, dst].copy_(self.c[:, src])
        self.tokens[dst] = self.tokens[src]
