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
    from charlm.formats import WeightFormat
    from charlm.request import GenerationResult

__all__ = ["__version__", "load", "evaluate_text", "generate"]


def load(path: str, device: str = "auto") -> Checkpoint:
    """Load a checkpoint onto a device ('auto' = CUDA when present). Any file that is not a usable
    checkpoint, however it is broken, raises CheckpointError naming the file; the device's own errors
    (CUDA out of memory) propagate as themselves."""
    from charlm.checkpoint import CheckpointError, load_checkpoint
    from charlm.device import resolve_device
    from charlm.inputs import input_errors

    target = resolve_device(device)  # outside the guard: a bad device name is not a bad file
    with input_errors(CheckpointError, path, "charlm checkpoint"):
        ckpt = load_checkpoint(path)  # read and checked on the CPU
    return ckpt.to(target)  # outside the guard too: a device out of memory is not a damaged file


def evaluate_text(ckpt: Checkpoint, text: str, weights: WeightFormat | None = None) -> dict[str, float]:
    """Bits per character of `text` under the model: by nn.LSTM in fp32 over one stream (state carried
    over the whole text), or, with `weights`, by the decode steps in that weight format (see
    charlm.evaluate.evaluate_decoded: what a served model's predictions cost in each format)."""
    from charlm.evaluate import evaluate, evaluate_decoded

    if weights is None:
        return evaluate(ckpt.model, ckpt.vocab.encode(text))
    return evaluate_decoded(ckpt.model, ckpt.vocab.encode(text), weights)


def generate(ckpt: Checkpoint, seed: str, weights: WeightFormat | None = None, **options: Any) -> GenerationResult:
    """Continue `seed`, decoding in `weights` (default: the checkpoint's format); options are
    GenerationRequest's (length, random_seed, stop) and SamplingParams' (scale_factor, top_k, top_p),
    given flat as before the request grouped its sampling settings."""
    from dataclasses import fields

    from charlm.engine import Engine
    from charlm.request import EngineLimits, GenerationRequest
    from charlm.sampling import SamplingParams

    sampling = {f.name for f in fields(SamplingParams)}
    params = SamplingParams(**{k: options.pop(k) for k in list(options) if k in sampling})
    request = GenerationRequest(seed=seed, sampling=params, **options)
    limits = EngineLimits(max_batch=1, max_length=max(request.length, 1), max_seed_chars=max(len(seed), 1))
    with Engine(ckpt.model, ckpt.vocab, limits, weights=weights or ckpt.weights) as engine:
        return engine.generate(request)
