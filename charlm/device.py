"""Which torch device a name means: a module of its own so the service can resolve its device
without importing the trainer (and the trainer's plotting and data code)."""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


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
