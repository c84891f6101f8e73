"""What the decode kernels can be asked for: a weight format and a code path, and the errors that
refuse them. Kept apart from charlm/native.py so that the checkpoint reader and the command line can
name them without loading the kernels (or PyTorch)."""

from __future__ import annotations

from typing import Literal

__all__ = ["ISAS", "WEIGHT_FORMATS", "UnsupportedISA", "WeightFormat", "WeightsError"]

WeightFormat = Literal["fp32", "bf16", "int8"]
# The decode weight formats, in _native.c's order (FMT_FP32, FMT_BF16, FMT_INT8).
WEIGHT_FORMATS: tuple[WeightFormat, ...] = ("fp32", "bf16", "int8")
# The kernels' code paths, in _native.c's order (ISA_PORTABLE, ISA_AVX2, ISA_AVX512).
ISAS = ("portable", "avx2", "avx512")


class WeightsError(ValueError):
    """These weights cannot be used in the asked format (NaN, infinite, or out of its range)."""


class UnsupportedISA(ValueError):
    """The kernel path asked for needs instructions this CPU (or this build) does not have."""
