"""The compiled decode kernels of `_native.c`, loaded with ctypes.

A one-request decode step through PyTorch is some thirty small operator calls plus a sampler of a
dozen more; their dispatch costs more than the arithmetic. These kernels run a layer's product,
its LSTM cell and the sampling of all rows in one call each, streaming the weights at memory speed.
A request's bits never depend on how many others share its step (see _native.c for how, in each
weight format); rows are blocked four at a time so that a weight read from memory serves several.

Decode weights come in three formats (`pack`): fp32; bf16 (half the bytes to read, the fp32
arithmetic on rounded weights); int8 (a quarter of the bytes, per-output-row scales, inputs
rounded per row, exact integer sums). The code path (portable C, AVX2, AVX-512 with VNNI) is
chosen from what the CPU reports, or forced with `Kernels.use`; every path gives the same bits.

`load()` returns None where the extension was not built (no C compiler at install time); the engine
then runs on PyTorch alone, in fp32, just slower.
"""

from __future__ import annotations

import ctypes
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from charlm.formats import ISAS, WEIGHT_FORMATS, UnsupportedISA, WeightFormat, WeightsError

__all__ = ["ISAS", "WEIGHT_FORMATS", "Kernels", "Packed", "UnsupportedISA", "WeightFormat", "WeightsError", "load",
           "pack", "scratch_for"]

PANEL = 16  # output columns per packed panel (_native.c's PANEL)

# The CPU features (charlm_cpu_features bits) and those each code path needs.
_FEATURES = {"avx2": 1, "fma": 2, "avx512f": 4, "avx512bw": 8, "avx512_vnni": 16}
_NEEDS = {"portable": (), "avx2": ("avx2", "fma"), "avx512": ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni")}

# int8 is refused for weights where rounding would zero more than this share of a row's non-zero
# weights: a row whose largest weight dwarfs the rest (a huge value) would lose them. Trained rows lose
# about 1 % of them (the shipped models: 37 % at worst, for a held-out cost of 0.001 bpc).
INT8_MAX_ZEROED = 0.9
# Inputs an int8 product may have: 255 * 127 * inputs must fit the kernels' 32-bit sums.
INT8_MAX_INPUTS = (2**31 - 1) // (255 * 127)

_ptr, _int = ctypes.c_void_p, ctypes.c_int


class _Weights(ctypes.Structure):
    """_native.c's charlm_weights."""

    _fields_ = [("panels", _ptr), ("format", _int), ("outputs", _int), ("inputs", _int), ("padded_inputs", _int),
                ("scale", _ptr), ("colsum", _ptr)]


@dataclass(frozen=True)
class Packed:
    """A linear layer's weight (out, in) laid out for charlm_linear in one format: panels of 16 output
    columns, zero-padded. fp32/bf16: each panel (in, 16); int8: (in/4, 16, 4) bytes with `scale` per
    output row and `colsum` (each row's sum of int8 weights). `bias` (out,) or None, always fp32."""

    panels: torch.Tensor
    outputs: int
    inputs: int
    bias: torch.Tensor | None = None
    format: WeightFormat = "fp32"
    padded_inputs: int = 0
    scale: torch.Tensor | None = None
    colsum: torch.Tensor | None = None

    @property
    def bias_address(self) -> int | None:
        return _addr(self.bias)

    @cached_property
    def struct(self) -> _Weights:
        """The C description of these weights (it points into the tensors above, which it outlives not)."""
        return _Weights(self.panels.data_ptr(), WEIGHT_FORMATS.index(self.format), self.outputs, self.inputs,
                        self.padded_inputs or self.inputs, _addr(self.scale), _addr(self.colsum))

    @cached_property
    def address(self) -> int:
        """Where `struct` lives, for the kernels' hot path."""
        return ctypes.addressof(self.struct)

    @property
    def nbytes(self) -> int:
        """Bytes a decode step reads for this layer (weights, scales, bias)."""
        parts = (self.panels, self.bias, self.scale, self.colsum)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def pack(weight: torch.Tensor, bias: torch.Tensor | None = None, fmt: WeightFormat = "fp32",
         name: str = "weight") -> Packed:
    """`weight` (out, in) in `fmt`, laid out for charlm_linear; raises WeightsError naming `name` when
    the values cannot be held in that format (NaN, infinity, beyond bf16's range, or int8 rounding
    that would wipe out a row)."""
    weight = weight.detach().float()
    out, inputs = weight.shape
    bias = None if bias is None else bias.detach().float().contiguous()
    if fmt != "fp32" and not bool(torch.isfinite(weight).all()):
        raise WeightsError(f"{name} holds NaN or infinite values: it cannot be decoded in {fmt} "
                           "(nor trusted in fp32); retrain or restore the checkpoint")
    npanels = -(-out // PANEL)
    if fmt == "int8":
        return _pack_int8(weight, bias, name, npanels)
    padded = weight.new_zeros(npanels * PANEL, inputs)
    padded[:out] = weight
    panels = padded.view(npanels, PANEL, inputs).transpose(1, 2).contiguous()
    if fmt == "bf16":
        panels = panels.bfloat16()
        if not bool(torch.isfinite(panels).all()):
            raise WeightsError(f"{name} holds values beyond bf16's range (largest {weight.abs().max().item():.3g}): "
                               "decode it in fp32")
        panels = panels.view(torch.int16)
    return Packed(panels, out, inputs, bias, fmt)


def _pack_int8(weight: torch.Tensor, bias: torch.Tensor | None, name: str, npanels: int) -> Packed:
    out, inputs = weight.shape
    if inputs > INT8_MAX_INPUTS:
        raise WeightsError(f"{name} has {inputs} inputs; int8 products take at most {INT8_MAX_INPUTS}: use bf16")
    scale = weight.abs().amax(dim=1) / 127
    q = torch.where(scale[:, None] > 0, weight / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None], 0.0)
    q = q.round().clamp(-127, 127)
    zeroed = ((q == 0) & (weight != 0)).sum(dim=1) / (weight != 0).sum(dim=1).clamp_min(1)
    worst = int(zeroed.argmax())
    if zeroed[worst] > INT8_MAX_ZEROED:
        raise WeightsError(
            f"{name} row {worst}: int8 rounding would zero {zeroed[worst]:.0%} of its weights (at most "
            f"{INT8_MAX_ZEROED:.0%} allowed): its largest weight ({weight[worst].abs().max().item():.3g}) dwarfs "
            "the others; decode this model in bf16 or fp32")
    padded_inputs = -(-inputs // 4) * 4
    grid = torch.zeros(npanels * PANEL, padded_inputs, dtype=torch.int8)
    grid[:out, :inputs] = q.to(torch.int8)
    panels = grid.view(npanels, PANEL, padded_inputs // 4, 4).transpose(1, 2).contiguous()
    colsum = torch.zeros(npanels * PANEL, dtype=torch.int32)
    colsum[:out] = q.sum(dim=1).to(torch.int32)
    scales = torch.zeros(npanels * PANEL)
    scales[:out] = scale
    return Packed(panels, out, inputs, bias, "int8", padded_inputs, scales, colsum)


class Kernels:
    """Typed entry points into the shared library. The `*_at` methods take raw addresses (the
    engine's hot path, no tensor views); the others take tensors and check them."""

    def __init__(self, lib: ctypes.CDLL):
        self._lib = lib
        lib.charlm_linear.argtypes = [_int, _ptr, _int, _int, _ptr, _int, _int, _ptr, _ptr, _ptr, _ptr, _int, _ptr,
                                      _int]
        lib.charlm_linear.restype = None
        lib.charlm_lstm_cell.argtypes = [_int, _ptr, _int, _ptr, _ptr, _int, _int, _int]
        lib.charlm_lstm_cell.restype = None
        lib.charlm_sample.argtypes = [_int, _ptr, _int, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _int]
        lib.charlm_sample.restype = _int
        lib.charlm_set_isa.argtypes = [_int]
        lib.charlm_set_isa.restype = _int
        lib.charlm_isa.restype = _int
        lib.charlm_cpu_features.restype = _int
        self.linear_at = lib.charlm_linear
        self.lstm_cell_at = lib.charlm_lstm_cell

    @property
    def isa(self) -> str:
        """The code path products and cells run: portable, avx2 or avx512 (with VNNI for int8)."""
        return ISAS[self._lib.charlm_isa()]

    @property
    def cpu_features(self) -> set[str]:
        """The instruction sets this CPU reports, of those the kernels can use."""
        bits = self._lib.charlm_cpu_features()
        return {name for name, bit in _FEATURES.items() if bits & bit}

    def use(self, isa: str) -> None:
        """Run `isa` from now on, in every engine of this process ("auto": the best the CPU has).
        Every path gives the same bits; forcing one lets tests compare them and a deployment pin one.
        Raises UnsupportedISA naming what the CPU lacks."""
        if isa != "auto" and isa not in ISAS:
            raise UnsupportedISA(f"unknown kernel path {isa!r}: choose auto, {', '.join(ISAS)}")
        if isa != "auto" and isa not in self.available():
            missing = [f for f in _NEEDS[isa] if f not in self.cpu_features]
            raise UnsupportedISA(f"the {isa} kernels need {', '.join(missing)}, which this CPU does not report; "
                                 f"it can run {', '.join(self.available())}: use one of those, or auto")
        if self._lib.charlm_set_isa(-1 if isa == "auto" else ISAS.index(isa)) < 0:
            raise UnsupportedISA(f"this build of charlm._native has no {isa} code (its compiler lacked it): "
                                 "use auto")

    def available(self) -> list[str]:
        """The kernel paths this machine runs."""
        have = self.cpu_features
        return [isa for isa in ISAS if all(f in have for f in _NEEDS[isa])]

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
        scratch = scratch_for(packed, rows)
        self.linear_at(
            rows, x.data_ptr(), x.size(1), x.size(1), _addr(x2), k2, k2, packed.address, _addr(addend),
            _addr(add_rows), y.data_ptr(), packed.outputs, _addr(scratch), torch.get_num_threads(),
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
        min_p: Sequence[float],
        uniforms: Sequence[float],
        out: torch.Tensor,
    ) -> torch.Tensor:
        """One id per row of logits (rows, vocab) into out[:rows], with sampling.sample_rows's
        semantics: top_k >= vocab, top_p > 1 and min_p 0 switch those filters off."""
        rows, vocab = logits.shape
        status = self._lib.charlm_sample(
            rows, logits.data_ptr(), vocab, (ctypes.c_float * rows)(*scale), (ctypes.c_int32 * rows)(*top_k),
            (ctypes.c_double * rows)(*top_p), (ctypes.c_double * rows)(*min_p), (ctypes.c_double * rows)(*uniforms),
            out.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("native sampler could not allocate its scratch memory")
        return out[:rows]


def scratch_for(packed: Packed | Sequence[Packed], rows: int) -> torch.Tensor | None:
    """The buffer charlm_linear needs for `rows` rows of these weights (int8 only: each row's
    inputs as bytes, and its scale)."""
    layers = [packed] if isinstance(packed, Packed) else list(packed)
    widest = max((p.padded_inputs for p in layers if p.format == "int8"), default=0)
    return torch.empty(rows * (widest + 4), dtype=torch.uint8) if widest else None


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
