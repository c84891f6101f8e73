"""Which torch device a name means: a module of its own so the service can resolve its device
without importing the trainer (and the trainer's plotting and data code)."""

from __future__ import annotations

import torch

__all__ = ["resolve_device", "resolve_precision", "native_bf16", "PRECISIONS"]


def resolve_device(device: str) -> torch.device:
    """'auto' → CUDA when present, else CPU; 'cuda:N' is checked to exist, so a typo fails here in one
    line instead of deep inside the first tensor copy."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {device!r} requested but CUDA is not available here (use --device cpu or auto)")
    return dev


PRECISIONS = ("auto", "fp32", "bf16")

# CPU flags (Linux /proc/cpuinfo) of a native bf16 matrix unit: without one, bf16 on a CPU is
# emulated and slower than fp32.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively (CUDA with bf16, or a CPU with AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return any(flag in cpu_flags() for flag in CPU_BF16_FLAGS)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a run (None: plain fp32). 'auto' is bf16 on CUDA that has it, fp32
    elsewhere; 'bf16' is refused where the hardware would only emulate it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and native_bf16(device) else None
    if not native_bf16(device):
        where = "this GPU" if device.type == "cuda" else "this CPU (it lacks AVX512-BF16 and AMX)"
        raise ValueError(f"precision bf16 is not native on {where}: it would be emulated and slower than fp32; "
                         "use --precision fp32 or auto")
    return torch.bfloat16
