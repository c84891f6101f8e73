"""One self-describing .safetensors file per model: weights plus vocabulary, config and training summary.

Never pickle: a checkpoint is data, so loading one can never run code. Writes are atomic so a crash
mid-save leaves the previous file intact. Loading trusts nothing in the file: the metadata is parsed
and checked, and every tensor's name, shape and dtype is compared with what the config implies
before any weight is read or any model is built, so a small crafted file can neither allocate
gigabytes nor fail later with a traceback.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from charlm.files import atomic_write
from charlm.formats import WEIGHT_FORMATS, WeightFormat
from charlm.model import CharLSTM, ModelConfig
from charlm.request import is_int
from charlm.vocab import Vocab

__all__ = ["Checkpoint", "CheckpointError", "CheckpointHeader", "load_checkpoint", "read_header", "read_safetensors",
           "save_checkpoint"]

FORMAT = "1"
FIX = "train a model with `charlm train` or point to a file it wrote"

# Generous bounds: far above any model this package trains, far below sizes that overflow or hang.
# They only guard the arithmetic; memory is bounded by comparing the shapes with the stored tensors.
MAX_WIDTH = 1 << 16  # embed and hidden
MAX_LAYERS = 256
MAX_VOCAB = 0x110000  # every Unicode code point

FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def _one_line(message: str) -> str:
    """Join a multi-line message (torch's load_state_dict writes several lines) into one line."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


class CheckpointError(ValueError):
    """The file is not a usable charlm checkpoint; the one-line message says which and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


@dataclass
class Checkpoint:
    model: CharLSTM
    vocab: Vocab
    train: dict[str, Any] = field(default_factory=dict)
    weights: WeightFormat = "fp32"  # the decode weight format the checkpoint asks for (charlm.native.WEIGHT_FORMATS)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def to(self, device: str | torch.device) -> Checkpoint:
        """Move the model to `device` (in place) and return self. Kept apart from reading the file: a device
        that fails here (CUDA out of memory) says nothing about the file, so callers do it outside the
        guard that reports a crash while reading as a damaged file."""
        self.model.to(device)
        return self


@dataclass(frozen=True)
class CheckpointHeader:
    """What a checkpoint holds, as its header says (checked as loading checks it): enough to list and
    choose a model without reading its weights."""

    config: ModelConfig
    vocab: Vocab
    train: dict[str, Any]
    weights: WeightFormat = "fp32"

    @property
    def parameters(self) -> int:
        return sum(math.prod(shape) for shape in expected_shapes(self.config).values())


def save_checkpoint(
    path: str | Path, model: CharLSTM, vocab: Vocab, train: dict[str, Any] | None = None,
    weights: WeightFormat = "fp32"
) -> None:
    """Write the model (fp32, whatever `weights` says: prefill and scoring run in fp32), its vocabulary,
    config and training summary, and `weights`: the decode weight format it is served in by default."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "charlm.format": FORMAT,
        "charlm.vocab": vocab.to_json(),
        "charlm.model": json.dumps(model.config.to_dict()),
        "charlm.train": json.dumps(train or {}),
        "charlm.weights": weights,
    }
    atomic_write(path, save(tensors, metadata=metadata))


def _check_readable(path: Path) -> None:
    """Open the file ourselves first: safetensors reports a permission problem as 'No such file'.

    Anything but a regular file is refused before opening: opening a FIFO would block forever.
    """
    if path.exists() and not path.is_file():
        raise CheckpointError(f"{path} is not a regular file (a directory?); point to a .safetensors file")
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}; check the path, or {FIX}") from None
    except PermissionError:
        why = f"({_owner_and_mode(path)}); {_permission_fix()}"
        raise CheckpointError(f"permission denied reading {path} {why}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None


def _owner_and_mode(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return "its directory may not be searchable"
    return f"mode {st.st_mode & 0o777:03o}, owner uid {st.st_uid}"


def _permission_fix() -> str:
    uid = os.geteuid() if hasattr(os, "geteuid") else "this user"
    return f"check the file's mode and owner and make it readable by uid {uid} (e.g. chmod a+r)"


def _safe_open(path: Path) -> Any:
    """A safe_open handle (use it in `with`), or a CheckpointError saying why the file is unusable."""
    _check_readable(path)
    try:
        return safe_open(str(path), framework="pt")
    except PermissionError:
        raise CheckpointError(f"permission denied reading {path}; {_permission_fix()}") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated, corrupt, or another format: {exc}); {FIX}"
        ) from None


def _get_tensor(path: Path, f: Any, name: str) -> torch.Tensor:
    try:
        tensor: torch.Tensor = f.get_tensor(name)
        return tensor
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: tensor {name!r} cannot be read (corrupt file: {exc}); {FIX}") from None


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file, with clear errors for anything else."""
    path = Path(path)
    with _safe_open(path) as f:
        metadata = f.metadata() or {}
        tensors = {k: _get_tensor(path, f, k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    return tensors, metadata


def _parse_json(path: Path, metadata: dict[str, str], key: str) -> Any:
    """json.loads of one metadata field; deep nesting (RecursionError) is refused like any bad JSON."""
    try:
        return json.loads(metadata[key])
    except KeyError:
        raise CheckpointError(f"{path} has broken charlm metadata: {key!r} is missing; {FIX}") from None
    except RecursionError:
        raise CheckpointError(f"{path} has broken charlm metadata: {key!r} is nested too deeply; {FIX}") from None
    except ValueError as exc:
        raise CheckpointError(f"{path} has broken charlm metadata: {key!r} is not JSON ({exc}); {FIX}") from None


def _parse_vocab(path: Path, metadata: dict[str, str]) -> Vocab:
    if "charlm.vocab" not in metadata:
        raise CheckpointError(f"{path} has broken charlm metadata: 'charlm.vocab' is missing; {FIX}")
    try:
        return Vocab.from_json(metadata["charlm.vocab"])
    except ValueError as exc:
        raise CheckpointError(f"{path} has a broken vocabulary: {exc}; {FIX}") from None


def _parse_config(path: Path, metadata: dict[str, str], vocab_size: int) -> ModelConfig:
    """The model config, every size a real int in range and dropout a float in [0, 1), checked before use."""
    raw = _parse_json(path, metadata, "charlm.model")
    broken = f"{path} has a broken model config in 'charlm.model'"
    if not isinstance(raw, dict):
        raise CheckpointError(f"{broken}: expected a JSON object, got {type(raw).__name__}; {FIX}")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CheckpointError(f"{broken}: unknown field {unknown[0]!r} (known: {', '.join(sorted(known))}); {FIX}")
    if "vocab_size" not in raw:
        raise CheckpointError(f"{broken}: 'vocab_size' is missing; {FIX}")
    limits = {"vocab_size": MAX_VOCAB, "embed": MAX_WIDTH, "hidden": MAX_WIDTH, "layers": MAX_LAYERS}
    for name, limit in limits.items():
        if name in raw and not (is_int(raw[name]) and 1 <= raw[name] <= limit):
            raise CheckpointError(f"{broken}: {name} must be an integer in [1, {limit}], got {raw[name]!r}; {FIX}")
    if "dropout" in raw:
        dropout = raw["dropout"]
        if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and math.isfinite(dropout)):
            raise CheckpointError(f"{broken}: dropout must be a number in [0, 1), got {dropout!r}; {FIX}")
        if not 0.0 <= dropout < 1.0:
            raise CheckpointError(f"{broken}: dropout must be in [0, 1), got {dropout!r}; {FIX}")
        raw["dropout"] = float(dropout)
    config = ModelConfig(**raw)
    if config.vocab_size != vocab_size:
        raise CheckpointError(
            f"{path}: model vocab_size {config.vocab_size} != {vocab_size} characters in its vocabulary; {FIX}"
        )
    return config


def _parse_train(path: Path, metadata: dict[str, str]) -> dict[str, Any]:
    if "charlm.train" not in metadata:
        return {}
    train = _parse_json(path, metadata, "charlm.train")
    if not isinstance(train, dict):
        raise CheckpointError(
            f"{path} has broken charlm metadata: 'charlm.train' must be a JSON object, got {type(train).__name__}; "
            f"{FIX}"
        )
    return train


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a CharLSTM with `config` has, by PyTorch's own name, with its shape."""
    v, e, h = config.vocab_size, config.embed, config.hidden
    shapes: dict[str, tuple[int, ...]] = {"embedding.weight": (v, e)}
    for k in range(config.layers):
        shapes[f"lstm.weight_ih_l{k}"] = (4 * h, e if k == 0 else h)
        shapes[f"lstm.weight_hh_l{k}"] = (4 * h, h)
        shapes[f"lstm.bias_ih_l{k}"] = (4 * h,)
        shapes[f"lstm.bias_hh_l{k}"] = (4 * h,)
    shapes["fc.weight"] = (v, h)
    shapes["fc.bias"] = (v,)
    return shapes


def _check_layout(path: Path, f: Any, expected: dict[str, tuple[int, ...]]) -> None:
    """Names, shapes and dtypes from the header only: nothing is read or allocated before this passes."""
    stored = set(f.keys())
    for name, shape in expected.items():
        if name not in stored:
            raise CheckpointError(
                f"{path}: tensor {name!r} (shape {list(shape)}) is missing; the weights do not match the config "
                f"in its metadata; {FIX}"
            )
        got = tuple(f.get_slice(name).get_shape())
        if got != shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {list(got)}, but the config in its metadata implies "
                f"{list(shape)}; {FIX}"
            )
        dtype = f.get_slice(name).get_dtype()
        if dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {dtype}, not a floating type "
                f"({', '.join(FLOAT_DTYPES.values())}); {FIX}"
            )
    extra = sorted(stored - expected.keys())
    if extra:
        raise CheckpointError(
            f"{path}: unexpected tensor {extra[0]!r} (shape {list(f.get_slice(extra[0]).get_shape())}) that the "
            f"config in its metadata does not have; {FIX}"
        )


def _read_weights(path: Path, f: Any, names: list[str]) -> dict[str, torch.Tensor]:
    """The weights as float32, refusing NaN or Inf: a model holding them generates only garbage."""
    tensors = {}
    for name in names:
        tensor = _get_tensor(path, f, name).to(torch.float32)
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: tensor {name!r} holds NaN or Inf values; the model is broken; {FIX}")
        tensors[name] = tensor
    return tensors


def _header(path: Path, f: Any) -> CheckpointHeader:
    """The checked header of an open checkpoint: metadata parsed, every tensor's name, shape and dtype
    matching the config. Nothing is read beyond the header."""
    metadata = f.metadata() or {}
    if metadata.get("charlm.format") != FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file but not a charlm checkpoint (format "
            f"{metadata.get('charlm.format')!r}, expected {FORMAT!r}); it lacks the charlm metadata; {FIX}"
        )
    vocab = _parse_vocab(path, metadata)
    config = _parse_config(path, metadata, len(vocab))
    train = _parse_train(path, metadata)
    weights = cast(WeightFormat, metadata.get("charlm.weights", "fp32"))
    if weights not in WEIGHT_FORMATS:
        raise CheckpointError(f"{path} names decode weights {weights!r}, not one of {', '.join(WEIGHT_FORMATS)}; "
                              "write it again with `charlm quantize`")
    _check_layout(path, f, expected_shapes(config))
    return CheckpointHeader(config, vocab, train, weights)


def read_header(path: str | Path) -> CheckpointHeader:
    """A checkpoint's header, checked, without reading its weights (listing models costs little)."""
    path = Path(path)
    with _safe_open(path) as f:
        return _header(path, f)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint onto `device`, in eval mode; anything wrong with the file is a one-line
    CheckpointError. A caller that reports crashes while reading as a damaged file (charlm.inputs.input_errors)
    loads onto the CPU inside that guard and calls Checkpoint.to(device) outside it."""
    path = Path(path)
    with _safe_open(path) as f:
        header = _header(path, f)
        tensors = _read_weights(path, f, list(expected_shapes(header.config)))
    config, vocab, train = header.config, header.vocab, header.train
    model = CharLSTM(config)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the config in its metadata: {exc}; {FIX}") from None
    return Checkpoint(model=model.eval(), vocab=vocab, train=train, weights=header.weights).to(device)
