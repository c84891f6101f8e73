"""charlm: character-level LSTM language models, trained on plain text.

The Python API in three calls::

    from charlm import load, evaluate_text, generate
    ckpt = load("models/mysterious_island.safetensors")
    evaluate_text(ckpt, "The engineer looked at the sea.")   # {"bpc": ..., "nats": ..., "chars": ...}
    generate(ckpt, "The island", length=200, scale_factor=2.0, random_seed=1).text
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from charlm.checkpoint import Checkpoint
    from charlm.engine import GenerationResult

__all__ = ["__version__", "load", "evaluate_text", "generate"]


def load(path: str, device: str = "auto") -> Checkpoint:
    """Load a checkpoint onto a device ('auto' = CUDA when present)."""
    from charlm.checkpoint import load_checkpoint
    from charlm.train import resolve_device

    return load_checkpoint(path, resolve_device(device))


def evaluate_text(ckpt: Checkpoint, text: str) -> dict[str, float]:
    """Bits per character of `text` under the model (state carried over the whole text)."""
    from charlm.train import evaluate

    return evaluate(ckpt.model, ckpt.vocab.encode(text))


def generate(ckpt: Checkpoint, seed: str, **options: Any) -> GenerationResult:
    """Continue `seed`; options are GenerationRequest's (length, scale_factor, top_k, top_p, random_seed, stop)."""
    from charlm.engine import Engine, EngineLimits, GenerationRequest

    request = GenerationRequest(seed=seed, **options)
    limits = EngineLimits(max_batch=1, max_length=max(request.length, 1), max_seed_chars=max(len(seed), 1))
    with Engine(ckpt.model, ckpt.vocab, limits) as engine:
        return engine.generate(request)
