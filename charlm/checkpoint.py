"""One self-describing .safetensors file per model: weights plus vocabulary, config and training summary.

Never pickle: a checkpoint is data, so loading one can never run code. Writes are atomic so a crash
mid-save leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from charlm.model import CharLSTM, ModelConfig
from charlm.vocab import Vocab

__all__ = ["Checkpoint", "CheckpointError", "save_checkpoint", "load_checkpoint", "atomic_write"]

FORMAT = "1"


class CheckpointError(ValueError):
    """The file is not a usable charlm checkpoint; the message says which and what to do."""


@dataclass
class Checkpoint:
    model: CharLSTM
    vocab: Vocab
    train: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    path: str | Path, model: CharLSTM, vocab: Vocab, train: dict[str, Any] | None = None
) -> None:
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "charlm.format": FORMAT,
        "charlm.vocab": vocab.to_json(),
        "charlm.model": json.dumps(model.config.to_dict()),
        "charlm.train": json.dumps(train or {}),
    }
    atomic_write(path, save(tensors, metadata=metadata))


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file, with clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated, corrupt, or another format: {exc}); "
            "train a model with `charlm train` or point to a file it wrote"
        ) from None
    return tensors, metadata


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint onto `device`, in eval mode."""
    tensors, metadata = read_safetensors(path)
    if metadata.get("charlm.format") != FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file but not a charlm checkpoint (format "
            f"{metadata.get('charlm.format')!r}, expected {FORMAT!r}); it lacks the charlm metadata"
        )
    try:
        vocab = Vocab.from_json(metadata["charlm.vocab"])
        config = ModelConfig(**json.loads(metadata["charlm.model"]))
        train = json.loads(metadata.get("charlm.train", "{}"))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} has broken charlm metadata: {exc}") from None
    if config.vocab_size != len(vocab):
        raise CheckpointError(
            f"{path}: model vocab_size {config.vocab_size} != {len(vocab)} characters in its vocabulary"
        )
    model = CharLSTM(config)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the config in its metadata: {exc}") from None
    return Checkpoint(model=model.to(device).eval(), vocab=vocab, train=train)
