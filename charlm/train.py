"""Training: B contiguous streams, truncated BPTT over whole windows, held-out bits per character.

The seed notebook trained on random 40-character windows from a fresh state, one character at a
time in Python. Here each step runs the whole (batch, seq_len) window through nn.LSTM in one call
and carries the LSTM state from window to window (detached), so every character is trained with
its full left context and the matrix multiplies are large.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch.nn import functional as F

from charlm import __version__
from charlm.checkpoint import CheckpointError, load_checkpoint, read_safetensors, save_checkpoint
from charlm.corpora import CorpusSet, load_corpora
from charlm.device import PRECISIONS, resolve_device, resolve_precision
from charlm.exit_codes import input_errors
from charlm.files import atomic_write
from charlm.model import CharLSTM, ModelConfig, State
from charlm.typography import QUOTE_STYLES

__all__ = [
    "TrainConfig", "TrainConfigError", "Option", "option_of", "field_types", "TrainResult", "ResumeError", "train",
    "evaluate",
]

LN2 = math.log(2.0)
MAX_TRAIN_RANDOM_SEED = 2**63 - 1  # torch seeds are 64-bit; the data order adds the epoch number to it

log = logging.getLogger(__name__)


class ResumeError(ValueError):
    """The saved training state is missing, or does not belong to this corpus or architecture."""


class TrainConfigError(ValueError):
    """A training setting is invalid; `field` names the TrainConfig field (the CLI turns it into its flag)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Option:
    """What a TrainConfig field means and which values it takes, kept in the field's metadata so that the
    dataclass is the one home of every training default and range: TrainConfig validates with it and the
    CLI builds `charlm train`'s flags from it."""

    doc: str  # the help text
    low: float | None = None  # smallest allowed value (None: unbounded) …
    high: float | None = None  # … and largest
    low_open: bool = False  # True: `low` itself is not allowed (> rather than >=)
    high_open: bool = False  # True: `high` itself is not allowed (< rather than <=)
    flag: str | None = None  # the CLI flag, when it is not --field-name (e.g. --no-strip)
    metavar: str | None = None  # the CLI's name for the value in --help
    cli: bool = True  # False: a Python-only setting
    choices: tuple[str, ...] | None = None  # the allowed values of a text setting
    many: bool = False  # the CLI flag may be given more than once (a tuple of values)

    def describe(self) -> str:
        """The range in words: '>= 1', '> 0', 'in [0, 1)'."""
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return "any value"

    def problem(self, value: object, kind: type) -> str | None:
        """Why `value` is not allowed ('must be ..., got ...'), or None when it is."""
        if self.choices is not None and value not in self.choices:
            return f"must be one of {', '.join(self.choices)}, got {value!r}"
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            return f"must be a whole number, got {value!r}"
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"must be a number, got {value!r}"
            if not math.isfinite(value):
                return f"must be a finite number, got {value!r}"
        if kind not in (int, float):
            return None
        assert isinstance(value, (int, float))
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return f"must be {self.describe()}, got {value!r}" if too_low or too_high else None


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _field(
    default: Any = MISSING, *, doc: str, low: float | None = None, high: float | None = None, low_open: bool = False,
    high_open: bool = False, flag: str | None = None, metavar: str | None = None, cli: bool = True,
    choices: tuple[str, ...] | None = None, many: bool = False,
) -> Any:
    """A dataclass field carrying its Option (help text, range, CLI flag); the arguments are Option's."""
    option = Option(doc, low, high, low_open, high_open, flag, metavar, cli, choices, many)
    return field(default=default, metadata={"option": option})


def _model_default(name: str) -> Any:
    """ModelConfig's default for a size, so that the model's defaults live in one place."""
    return next(f.default for f in fields(ModelConfig) if f.name == name)


def option_of(f: Field[Any]) -> Option | None:
    """The Option of a TrainConfig field (None for a field without one)."""
    return f.metadata.get("option")


@cache
def field_types() -> dict[str, type]:
    """Each TrainConfig field's value type, `X | None` read as X: what the CLI parses and validation checks."""
    types: dict[str, type] = {}
    for name, hint in typing.get_type_hints(TrainConfig).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        types[name] = args[0] if args else hint
    return types


@dataclass
class TrainConfig:
    """One training run. Each field's Option holds its help text and allowed range; `charlm train` takes
    its flags, defaults and checks from here, so a default or a range is changed in this class only."""

    corpus: tuple[str, ...] = _field(
        doc="UTF-8 text file, or a directory of *.txt files, to train on (the CLI also takes an http(s):// URL, "
            "downloaded once); repeat it for several corpora: each keeps its own held-out tail", many=True,
    )
    out: str = _field(doc="checkpoint path (.safetensors); the best model by held-out bpc is kept here, and "
                          "its .state.safetensors, .metrics.jsonl and .loss.png beside it")
    embed: int = _field(_model_default("embed"), doc="embedding width", low=1)
    hidden: int = _field(_model_default("hidden"), doc="LSTM width: the main knob for quality and speed", low=1)
    layers: int = _field(_model_default("layers"), doc="stacked LSTM layers", low=1)
    dropout: float = _field(_model_default("dropout"), doc="dropout on the embedding, between layers and before "
                                                           "the output", low=0.0, high=1.0, high_open=True)
    seq_len: int = _field(128, doc="characters per window (truncated BPTT length)", low=1)
    batch_size: int = _field(64, doc="contiguous streams trained side by side", low=1)
    lr: float = _field(3e-3, doc="peak AdamW learning rate, reached after warmup, then cosine down to "
                                 "lr * min_lr_ratio", low=0.0, low_open=True)
    min_lr_ratio: float = _field(0.02, doc="final learning rate as a fraction of lr", low=0.0, high=1.0)
    warmup_steps: int = _field(100, doc="steps of linear learning-rate warmup", low=0)
    weight_decay: float = _field(0.05, doc="AdamW weight decay", low=0.0, high=1.0, high_open=True)
    grad_clip: float = _field(1.0, doc="gradient norm clipping threshold", low=0.0, low_open=True)
    steps: int | None = _field(None, doc="optimizer steps to run", low=1)
    time_budget: float | None = _field(None, doc="stop after this many seconds of training (the schedule follows "
                                                 "steps or seconds, whichever ends first)",
                                       low=0.0, low_open=True, metavar="SECONDS")
    eval_interval: int = _field(100, doc="steps between held-out evaluations and checkpoint/state saves", low=1)
    log_interval: int = _field(10, doc="steps between metrics.jsonl lines", low=1)
    val_fraction: float = _field(0.1, doc="held-out fraction: the end of the text", low=0.0, high=1.0,
                                 low_open=True, high_open=True)
    device: str = _field("auto", doc="auto, cpu, cuda or cuda:N")
    random_seed: int = _field(1337, doc="seed of the weight initialisation, dropout and data order",
                              low=0, high=MAX_TRAIN_RANDOM_SEED)
    strip: bool = _field(True, doc="cut the Gutenberg licence header and footer (default); --no-strip keeps them",
                         flag="--no-strip")
    resume: bool = _field(False, doc="continue from the saved training state (<out>.state.safetensors)")
    init_from: str | None = _field(None, doc="start from this checkpoint's weights (same sizes; characters new "
                                             "to this corpus get fresh rows; new schedule)", metavar="CHECKPOINT")
    select_on: str | None = _field(None, doc="the corpus (file name) whose held-out bpc picks the best checkpoint; "
                                             "default: the last one", metavar="NAME")
    quotes: str = _field("keep", doc="straight quotes: keep them, or make them typographic (“ ” ‘ ’) by context",
                         choices=QUOTE_STYLES)
    precision: str = _field("auto", doc="auto (bf16 on a GPU that has it, else fp32), fp32, or bf16 (only where "
                                        "the hardware has it natively)", choices=PRECISIONS)
    corpus_names: tuple[str, ...] | None = _field(None, doc="what to record as each corpus's source (e.g. its "
                                                            "URL); default: the paths", cli=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every range and that no output would overwrite an input; raises TrainConfigError.
        Runs on construction and again when training starts (a config may be changed in between)."""
        if isinstance(self.corpus, (str, Path)):  # one corpus, as Python callers often give it
            self.corpus = (str(self.corpus),)
        self.corpus = tuple(str(c) for c in self.corpus)
        types = field_types()
        for f in fields(self):
            option, value = option_of(f), getattr(self, f.name)
            if option is None or value is None:
                continue
            problem = option.problem(value, types[f.name])
            if problem:
                raise TrainConfigError(f.name, f"{f.name} {problem}")
        if not self.corpus:
            raise TrainConfigError("corpus", "give at least one corpus")
        if self.corpus_names is not None and len(self.corpus_names) != len(self.corpus):
            raise TrainConfigError("corpus_names", "corpus_names must name each corpus once")
        if self.steps is None and self.time_budget is None:
            raise TrainConfigError("steps", "give steps or time_budget (or both)")
        if self.resume and self.init_from:
            raise TrainConfigError("init_from", "give resume or init_from, not both: a resumed run already has "
                                                "its weights")
        self._check_paths()

    def _check_paths(self) -> None:
        """Refuse an `out` that is, or whose sidecars are, an input: training would overwrite the corpus or
        the starting checkpoint (and a fresh run deletes the old metrics file before it starts)."""
        if not str(self.out).strip() or not Path(self.out).name:
            raise TrainConfigError("out", f"out must be a file path, got {str(self.out)!r}")
        out = Path(self.out)
        if out.is_dir():
            raise TrainConfigError("out", f"out {out} is a directory; give a file path such as "
                                          f"{out / 'model.safetensors'}")
        outputs = {"checkpoint": out, "training state": self.state_path, "metrics file": self.metrics_path,
                   "loss plot": self.plot_path}
        inputs = [("corpus", Path(c)) for c in self.corpus]
        inputs += [("corpus", p) for c in map(Path, self.corpus) if c.is_dir() for p in c.glob("*.txt")]
        if self.init_from:
            inputs.append(("init_from checkpoint", Path(self.init_from)))
        for written, target in outputs.items():
            for read, source in inputs:
                if _same_file(target, source):
                    via = "" if written == "checkpoint" else f" (its {written} is {target})"
                    raise TrainConfigError("out", f"out {out} would overwrite the {read} {source}{via}; "
                                                  "choose another output path")

    @property
    def state_path(self) -> Path:
        """The resume sidecar: latest weights, optimizer, step, data position, RNG."""
        return Path(self.out).with_suffix(".state.safetensors")

    @property
    def metrics_path(self) -> Path:
        return Path(self.out).with_suffix(".metrics.jsonl")

    @property
    def plot_path(self) -> Path:
        return Path(self.out).with_suffix(".loss.png")


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: equal once resolved (symlinks, '..'), or, where both exist, the same
    inode (hard links, case-insensitive file systems)."""
    try:
        if a.resolve() == b.resolve():
            return True
    except (OSError, RuntimeError):  # a symlink loop: compare what we can
        if a.absolute() == b.absolute():
            return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


@dataclass
class TrainResult:
    step: int
    seconds: float
    best_val_bpc: float
    interrupted: bool
    summary: dict[str, Any] = field(default_factory=dict)


@torch.inference_mode()
def evaluate(model: CharLSTM, ids: torch.Tensor, chunk: int = 8192) -> dict[str, float]:
    """Mean loss over `ids` predicting each character from all before it (one stream, state carried)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    state: State | None = None
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, chunk):
        x = ids[start : start + chunk].to(device)
        y = ids[start + 1 : start + chunk + 1].to(device)
        x = x[: len(y)]
        logits, state, _ = model(x[None], state)
        total += F.cross_entropy(logits[0].float(), y, reduction="sum").item()
        count += len(y)
    model.train(was_training)
    nats = total / max(count, 1)
    return {"nats": nats, "bpc": nats / LN2, "chars": count}


class _Streams:
    """B contiguous streams over the training ids, windows of T, a fresh random offset each epoch."""

    def __init__(self, ids: torch.Tensor, batch: int, seq_len: int, random_seed: int):
        if len(ids) < batch * (seq_len + 1) + seq_len:
            raise ValueError(
                f"training text of {len(ids)} characters is too short for batch_size={batch} x "
                f"seq_len={seq_len}; lower them or use a longer corpus"
            )
        self.ids, self.batch, self.seq_len, self.random_seed = ids, batch, seq_len, random_seed

    def epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(inputs, targets) as (B, L) streams for this epoch, and its number of windows."""
        rng = torch.Generator().manual_seed(self.random_seed + epoch)
        offset = int(torch.randint(self.seq_len, (1,), generator=rng))
        length = (len(self.ids) - 1 - offset) // self.batch
        x = self.ids[offset : offset + self.batch * length].view(self.batch, length)
        y = self.ids[offset + 1 : offset + 1 + self.batch * length].view(self.batch, length)
        return x, y, length // self.seq_len


def _lr(cfg: TrainConfig, step: int, progress: float) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * warm * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def _save_state(
    cfg: TrainConfig, model: CharLSTM, opt: torch.optim.Optimizer, carry: State, info: dict[str, Any]
) -> None:
    """Everything needed to continue exactly, as safetensors + JSON: loading it never unpickles."""
    sd = opt.state_dict()
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            tensors[f"optim.{idx}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["carry.h"], tensors["carry.c"] = (t.detach().cpu().contiguous() for t in carry)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {"charlm.state": json.dumps({**info, "param_groups": sd["param_groups"]})}
    atomic_write(cfg.state_path, save(tensors, metadata=meta))


def _load_state(
    cfg: TrainConfig, model: CharLSTM, opt: torch.optim.Optimizer, device: torch.device, corpus_sha: str
) -> tuple[dict[str, Any], State]:
    tensors, meta = read_safetensors(cfg.state_path)
    try:
        info = json.loads(meta["charlm.state"])
    except (KeyError, ValueError):
        raise ResumeError(f"{cfg.state_path} is not a charlm training state") from None
    _check_resumable(cfg, info, corpus_sha, model.config)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": info.pop("param_groups")})
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return info, (tensors["carry.h"].to(device), tensors["carry.c"].to(device))


def _check_resumable(cfg: TrainConfig, info: dict[str, Any], corpus_sha: str, model_cfg: ModelConfig) -> None:
    if info["corpus_sha256"] != corpus_sha:
        raise ResumeError(
            f"cannot resume: {cfg.state_path} was trained on a different corpus "
            f"(sha256 {info['corpus_sha256'][:12]}…, this one {corpus_sha[:12]}…)"
        )
    if info["model"] != model_cfg.to_dict():
        raise ResumeError(f"cannot resume: architecture {model_cfg.to_dict()} differs from the saved {info['model']}")
    if (info["batch_size"], info["seq_len"]) != (cfg.batch_size, cfg.seq_len):
        raise ResumeError(
            f"cannot resume: batch_size/seq_len {cfg.batch_size}/{cfg.seq_len} differ from the saved "
            f"{info['batch_size']}/{info['seq_len']}"
        )


def _read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The rows of a metrics.jsonl file, and how many lines were skipped because they are not JSON objects:
    a run killed mid-write leaves half a line, and a damaged line must not stop a run (or its resume)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return [], 0
    rows: list[dict[str, Any]] = []
    skipped = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            skipped += 1
    return rows, skipped


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _plot(cfg: TrainConfig, rows: list[dict[str, Any]]) -> None:
    """Training loss and held-out bpc against wall-clock time, from the rows of metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> list[tuple[float, float]]:
        return [(r["seconds"] / 60, r[key]) for r in rows if _is_number(r.get("seconds")) and _is_number(r.get(key))]

    train, val = series("train_bpc"), series("val_bpc")
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="training bpc (with dropout)", alpha=0.6)
    if val:
        ax.plot(*zip(*val), "o-", label="held-out bpc")
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel("bits per character")
    ax.set_title(Path(cfg.out).name)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    fig.savefig(cfg.plot_path, dpi=100)
    plt.close(fig)


ProgressFn = Callable[[dict[str, Any]], None]

# The parameters with one row per character: the rest of the model does not depend on the vocabulary.
_VOCAB_ROWS = ("embedding.weight", "fc.weight", "fc.bias")


def train(cfg: TrainConfig, progress: ProgressFn | None = None) -> TrainResult:
    """Train (or resume) and keep the best checkpoint by held-out bpc at `cfg.out`.

    A KeyboardInterrupt stops the loop; what was learnt is evaluated and saved before returning.
    """
    return _Trainer(cfg, progress).run()


class _Trainer:
    """One run: data, model and optimizer, and the counters (`info`) that a resume restores."""

    def __init__(self, cfg: TrainConfig, progress: ProgressFn | None):
        cfg.validate()
        if cfg.resume and not cfg.state_path.exists():
            raise ResumeError(f"nothing to resume: {cfg.state_path} does not exist; run without --resume to start "
                              "a new run")
        self.cfg, self.progress = cfg, progress
        self.metrics_warned = False
        self.device = resolve_device(cfg.device)
        dtype = resolve_precision(cfg.precision, self.device)  # refused before anything is touched
        self.autocast = torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
        self.precision = "bf16" if dtype is not None else "fp32"
        torch.manual_seed(cfg.random_seed)
        self.data: CorpusSet = load_corpora(cfg.corpus, cfg.val_fraction, cfg.strip, cfg.quotes, cfg.corpus_names)
        self.selected = self.data.select(cfg.select_on)
        self.vocab = self.data.vocab
        self.corpus_sha = self.data.sha256
        self.val_ids = self.data.val_ids()
        self.streams = _Streams(self.data.train_ids(), cfg.batch_size, cfg.seq_len, cfg.random_seed)
        self.model_cfg = ModelConfig(len(self.vocab), cfg.embed, cfg.hidden, cfg.layers, cfg.dropout)
        self.model = CharLSTM(self.model_cfg).to(self.device)
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99)
        )
        shape = (cfg.layers, cfg.batch_size, cfg.hidden)
        self.carry: State = (torch.zeros(shape, device=self.device), torch.zeros(shape, device=self.device))
        self.info: dict[str, Any] = {"step": 0, "epoch": 0, "window": 0, "seconds": 0.0, "chars": 0,
                                     "best_val_bpc": math.inf, "best_step": 0, "init_from": None}
        if cfg.init_from:
            self.info["init_from"] = self._start_from(cfg.init_from)
        if cfg.resume:
            with input_errors(ResumeError, cfg.state_path, "charlm training state"):
                saved, self.carry = _load_state(cfg, self.model, self.opt, self.device, self.corpus_sha)
            self.info.update({k: saved.get(k, v) for k, v in self.info.items()})
            self.rewind_metrics()
        else:
            Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)  # metrics are appended before the first save
            cfg.metrics_path.unlink(missing_ok=True)
        self.x_all, self.y_all, self.windows = self.streams.epoch(self.info["epoch"])

    def _start_from(self, path: str) -> dict[str, Any]:
        """Load a trained checkpoint's weights (same sizes; dropout and schedule are this run's) and return
        what the new checkpoint records about it.

        The vocabularies may differ (pretrain on a shelf, fine-tune on one book): a character in both
        keeps its embedding and output rows, a character new to this corpus keeps its fresh rows, and
        one only the old model knew is dropped.
        """
        with input_errors(CheckpointError, path, "charlm checkpoint"):
            ckpt = load_checkpoint(path, self.device)
        sizes = ("embed", "hidden", "layers")
        theirs, ours = ckpt.config.to_dict(), self.model_cfg.to_dict()
        if any(theirs[k] != ours[k] for k in sizes):
            raise ResumeError(
                f"cannot start from {path}: its sizes {[theirs[k] for k in sizes]} differ from this run's "
                f"{[ours[k] for k in sizes]} (embed, hidden, layers)"
            )
        old, new = ckpt.vocab, self.vocab
        shared = [c for c in new.chars if c in old]
        state = {k: v for k, v in ckpt.model.state_dict().items() if k not in _VOCAB_ROWS}
        fresh = self.model.state_dict()
        with torch.no_grad():
            to, frm = new.encode("".join(shared)).to(self.device), old.encode("".join(shared)).to(self.device)
            for name in _VOCAB_ROWS:
                rows = fresh[name].clone()
                rows[to] = ckpt.model.state_dict()[name][frm]
                state[name] = rows
        self.model.load_state_dict(state)
        return {"checkpoint": Path(path).name, "config": theirs,
                "vocabulary": {"kept": len(shared), "added": [c for c in new.chars if c not in old],
                               "dropped": [c for c in old.chars if c not in new]},
                **{k: ckpt.train.get(k) for k in ("steps", "seconds", "val_bpc", "hyperparameters", "init_from")}}

    def run(self) -> TrainResult:
        cfg, info = self.cfg, self.info
        self.model.train()
        interrupted = False
        window_t0, window_chars = time.perf_counter(), 0
        try:
            while self.progress_fraction() < 1.0:
                t0 = time.perf_counter()
                x, y = self.next_window()
                lr = _lr(cfg, info["step"], self.progress_fraction())
                loss = self.step(x, y, lr)
                info["step"] += 1
                info["window"] += 1
                info["chars"] += x.numel()
                window_chars += x.numel()
                info["seconds"] += time.perf_counter() - t0
                if info["step"] % cfg.log_interval == 0:
                    now = time.perf_counter()
                    self.log({"step": info["step"], "seconds": round(info["seconds"], 2),
                              "train_bpc": loss.item() / LN2, "lr": lr,
                              "chars_per_s": window_chars / (now - window_t0), "progress": self.progress_fraction()})
                    window_t0, window_chars = now, 0
                if info["step"] % cfg.eval_interval == 0:
                    t_eval = time.perf_counter()
                    self.checkpoint()
                    info["seconds"] += time.perf_counter() - t_eval
                    window_t0, window_chars = time.perf_counter(), 0
        except KeyboardInterrupt:
            interrupted = True
        if info["step"] % cfg.eval_interval != 0 or interrupted or not Path(cfg.out).exists():
            self.checkpoint()
        return TrainResult(info["step"], info["seconds"], info["best_val_bpc"], interrupted, self.summary())

    def next_window(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (inputs, targets) window of every stream; a new epoch starts from a zero state."""
        info, seq_len = self.info, self.cfg.seq_len
        if info["window"] >= self.windows:
            info["epoch"], info["window"] = info["epoch"] + 1, 0
            self.x_all, self.y_all, self.windows = self.streams.epoch(info["epoch"])
            self.carry = (torch.zeros_like(self.carry[0]), torch.zeros_like(self.carry[1]))
        s = info["window"] * seq_len
        x = self.x_all[:, s : s + seq_len].to(self.device, non_blocking=True)
        y = self.y_all[:, s : s + seq_len].to(self.device, non_blocking=True)
        return x, y

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
        """One optimizer step on a window, the state carried in and detached out; returns the loss
        (a tensor: reading it waits for the device, so it is read only when logged)."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        with self.autocast:
            _, state, loss = self.model(x, self.carry, y)
        self.carry = (state[0].detach().float(), state[1].detach().float())
        self.opt.zero_grad(set_to_none=True)
        assert loss is not None
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        return loss.detach()

    def progress_fraction(self) -> float:
        """How far along the schedule is: steps or seconds, whichever is further."""
        fractions = []
        if self.cfg.steps:
            fractions.append(self.info["step"] / self.cfg.steps)
        if self.cfg.time_budget:
            fractions.append(self.info["seconds"] / self.cfg.time_budget)
        return max(fractions)

    def checkpoint(self) -> float:
        """Evaluate every corpus's held-out tail; save the model if the selected corpus's bpc is the best yet,
        and always the resume state and plot."""
        cfg, info = self.cfg, self.info
        results = [evaluate(self.model, ids) for ids in self.val_ids]
        bpc = results[self.selected]["bpc"]
        if bpc < info["best_val_bpc"]:
            info["best_val_bpc"] = bpc
            info["best_step"] = info["step"]
            save_checkpoint(cfg.out, self.model, self.vocab, self.summary())
        state_info = {**info, "corpus_sha256": self.corpus_sha, "model": self.model_cfg.to_dict(),
                      "batch_size": cfg.batch_size, "seq_len": cfg.seq_len}
        _save_state(cfg, self.model, self.opt, self.carry, state_info)
        row: dict[str, Any] = {"step": info["step"], "seconds": round(info["seconds"], 2), "val_bpc": bpc}
        if len(results) > 1:
            nats = sum(r["nats"] * r["chars"] for r in results) / sum(r["chars"] for r in results)
            row["val_bpc_all"] = nats / LN2
            row["val_bpc_by_corpus"] = {name: r["bpc"] for name, r in zip(self.data.names, results)}
        self.log(row)
        _plot(cfg, self.read_metrics())
        return bpc

    def read_metrics(self) -> list[dict[str, Any]]:
        """This run's metrics rows; lines that are not JSON objects are left out, with one warning per run."""
        rows, skipped = _read_metrics(self.cfg.metrics_path)
        if skipped and not self.metrics_warned:
            self.metrics_warned = True
            log.warning("skipped %d line(s) of %s that are not JSON objects (a run killed mid-write leaves half a "
                        "line); they are left out of the plot", skipped, self.cfg.metrics_path)
        return rows

    def rewind_metrics(self) -> None:
        """On resume, rewrite metrics.jsonl as of the restored step: rows logged after the last saved state
        are trained again (and would be logged twice), and a half-written last line would swallow the next."""
        if not self.cfg.metrics_path.exists():
            return
        step = self.info["step"]
        rows = [r for r in self.read_metrics() if not (_is_number(r.get("step")) and r["step"] > step)]
        atomic_write(self.cfg.metrics_path, "".join(json.dumps(r) + "\n" for r in rows).encode())

    def log(self, row: dict[str, Any]) -> None:
        with self.cfg.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.progress:
            self.progress(row)

    def summary(self) -> dict[str, Any]:
        """The training record kept in the checkpoint's metadata."""
        cfg, info = self.cfg, self.info
        hyper = ("seq_len", "batch_size", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip",
                 "random_seed")
        data = self.data
        return {
            "corpus": ", ".join(data.names),
            "corpus_sha256": self.corpus_sha,
            "corpora": [c.record() for c in data.corpora],
            "select_on": data.names[self.selected],
            "strip_gutenberg": cfg.strip,
            "quotes": cfg.quotes,
            "val_fraction": cfg.val_fraction,
            "train_chars": data.train_chars(),
            "val_chars": sum(len(c.val) for c in data.corpora),
            "steps": info["step"],
            "epochs": round(info["chars"] / data.train_chars(), 2),
            "seconds": round(info["seconds"], 1),
            "device": str(self.device),
            "precision": self.precision,
            "val_bpc": round(info["best_val_bpc"], 4),
            "hyperparameters": {k: v for k, v in asdict(cfg).items() if k in hyper},
            "init_from": info["init_from"],
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "version": __version__,
        }
