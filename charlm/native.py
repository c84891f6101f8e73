"""The compiled decode kernels of `_native.c`, loaded with ctypes.

A one-request decode step through PyTorch is some thirty small operator calls plus a sampler of a
dozen more; their dispatch costs more than the arithmetic. These kernels run a layer's product,
its LSTM cell and the sampling of all rows in one call each, streaming the weights at memory speed.
Each output of a product is one chain of fused multiply-adds in input order, whatever the number of
rows, so a request's bits never depend on how many others share its step; rows are blocked four at a
time so that a weight read from memory serves several rows.

`load()` returns None where the extension was not built (no C compiler at install time); the engine
then runs on PyTorch alone, just slower.
"""

from __future__ import annotations

import ctypes
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Kernels", "Packed", "load", "pack"]

PANEL = 16  # output columns per packed panel (_native.c's PANEL)

_ptr, _int = ctypes.c_void_p, ctypes.c_int


@dataclass(frozen=True)
class Packed:
    """A linear layer's weight (out, in) laid out for charlm_linear: panels of 16 output columns,
    each (in, 16), zero-padded; `bias` (out,) or None."""

    panels: torch.Tensor
    outputs: int
    inputs: int
    bias: torch.Tensor | None = None

    @property
    def bias_address(self) -> int | None:
        return _addr(self.bias)


def pack(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Packed:
    out, inputs = weight.shape
    npanels = -(-out // PANEL)
    padded = weight.new_zeros(npanels * PANEL, inputs)
    padded[:out] = weight
    panels = padded.view(npanels, PANEL, inputs).transpose(1, 2).contiguous().float()
    return Packed(panels, out, inputs, None if bias is None else bias.float().contiguous())


class Kernels:
    """Typed entry points into the shared library. The `*_at` methods take raw addresses (the
    engine's hot path, no tensor views); the others take tensors and check them."""

    def __init__(self, lib: ctypes.CDLL):
        self._lib = lib
        lib.charlm_linear.argtypes = [_int, _ptr, _int, _int, _ptr, _int, _int, _ptr, _int, _ptr, _ptr, _ptr, _int,
                                      _int]
        lib.charlm_linear.restype = None
        lib.charlm_lstm_cell.argtypes = [_int, _ptr, _int, _ptr, _ptr, _int, _int, _int]
        lib.charlm_lstm_cell.restype = None
        lib.charlm_sample.argtypes = [_int, _ptr, _int, _ptr, _ptr, _ptr, _ptr, _ptr, _int]
        lib.charlm_sample.restype = _int
        lib.charlm_force_portable.argtypes = [_int]
        lib.charlm_uses_avx2.restype = _int
        self.linear_at = lib.charlm_linear
        self.lstm_cell_at = lib.charlm_lstm_cell

    @property
    def uses_avx2(self) -> bool:
        return bool(self._lib.charlm_uses_avx2())

    def force_portable(self, portable: bool) -> None:
        """Run the portable C code even where AVX2 is available (for tests: same bits, slower)."""
        self._lib.charlm_force_portable(int(portable))

    def linear(
        self,
        packed: Packed,
        x: torch.Tensor,
        x2: torch.Tensor | None = None,
        addend: torch.Tensor | None = None,
        add_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[x, x2] @ weight.T + addend, where addend is `packed.bias` unless given; with `add_rows`,
        row r adds addend[add_rows[r]] (an embedding-table lookup)."""
        k2 = 0 if x2 is None else x2.size(1)
        if x.size(1) + k2 != packed.inputs:
            raise ValueError(f"inputs: expected {packed.inputs} columns, got {x.size(1) + k2}")
        tensors = [t for t in (x, x2, addend, add_rows) if t is not None]
        if any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
            raise ValueError("native kernels take contiguous CPU tensors")
        addend = packed.bias if addend is None else addend
        rows = x.size(0)
        y = torch.empty(rows, packed.outputs)
        self.linear_at(
            rows, x.data_ptr(), x.size(1), x.size(1), _addr(x2), k2, k2, packed.panels.data_ptr(), packed.outputs,
            _addr(addend), _addr(add_rows), y.data_ptr(), packed.outputs, torch.get_num_threads(),
        )  # fmt: skip
        return y

    def lstm_cell(self, gates: torch.Tensor, c: torch.Tensor, h: torch.Tensor) -> None:
        """Update c and h (rows, hidden) in place from gates (rows, 4*hidden) ordered (i, f, o, g)."""
        rows, hidden = c.shape
        if gates.shape != (rows, 4 * hidden) or h.shape != c.shape:
            raise ValueError("lstm_cell: gates must be (rows, 4*hidden), c and h (rows, hidden)")
        self.lstm_cell_at(rows, gates.data_ptr(), 4 * hidden, c.data_ptr(), h.data_ptr(), hidden, hidden,
                          torch.get_num_threads())

    def sample(
        self,
        logits: torch.Tensor,
        scale: Sequence[float],
        top_k: Sequence[int],
        top_p: Sequence[float],
        uniforms: Sequence[float],
        out: torch.Tensor,
    ) -> torch.Tensor:
        """One id per row of logits (rows, vocab) into out[:rows], with sampling.sample_rows's
        semantics: top_k >= vocab and top_p > 1 switch those filters off."""
        rows, vocab = logits.shape
        status = self._lib.charlm_sample(
            rows, logits.data_ptr(), vocab, (ctypes.c_float * rows)(*scale), (ctypes.c_int32 * rows)(*top_k),
            (ctypes.c_double * rows)(*top_p), (ctypes.c_double * rows)(*uniforms), out.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("native sampler could not allocate its scratch memory")
        return out[:rows]


def _addr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def load() -> Kernels | None:
    """The kernels, or None where the extension is not installed or cannot be loaded."""
    spec = importlib.util.find_spec("charlm._native")
    if spec is None or spec.origin is None:
        return None
    try:
        return Kernels(ctypes.CDLL(spec.origin))
    except OSError:
        return None
