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

import numpy as np
import torch
from safetensors.torch import save
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from charlm import __version__
from charlm.checkpoint import CheckpointError, load_checkpoint, read_safetensors, save_checkpoint
from charlm.corpora import CorpusSet, load_corpora
from charlm.device import PRECISIONS, resolve_device, resolve_precision
from charlm.distributed import StopSignals, World, all_max, all_rows, all_sum, barrier, process_group
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

    def epoch(self, epoch: int, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(inputs, targets) as (B, L) streams for this epoch (only `rows` of them: a process's share),
        and its number of windows."""
        rng = torch.Generator().manual_seed(self.random_seed + epoch)
        offset = int(torch.randint(self.seq_len, (1,), generator=rng))
        length = (len(self.ids) - 1 - offset) // self.batch
        x = self.ids[offset : offset + self.batch * length].view(self.batch, length)
        y = self.ids[offset + 1 : offset + 1 + self.batch * length].view(self.batch, length)
        return x[rows], y[rows], length // self.seq_len


def _seed_rng(random_seed: int, step: int, rank: int) -> None:
    """Seed this process's RNG (dropout) from the run's seed, the step and the rank."""
    seed = int(np.random.SeedSequence([random_seed, step, rank]).generate_state(1, np.uint64)[0])
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed)


def _lr(cfg: TrainConfig, step: int, progress: float) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * warm * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def _save_state(
    cfg: TrainConfig, model: CharLSTM, opt: torch.optim.Optimizer, run: dict[str, torch.Tensor], info: dict[str, Any]
) -> None:
    """Everything needed to continue exactly, as safetensors + JSON: loading it never unpickles.
    `run` holds the carried state (carry.h, carry.c) and each rank's RNG (rng.cpu, rng.cuda: a row each)."""
    sd = opt.state_dict()
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            tensors[f"optim.{idx}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors.update({k: v.detach().cpu().contiguous() for k, v in run.items()})
    meta = {"charlm.state": json.dumps({**info, "param_groups": sd["param_groups"]})}
    atomic_write(cfg.state_path, save(tensors, metadata=meta))


def _load_state(
    cfg: TrainConfig, model: CharLSTM, opt: torch.optim.Optimizer, corpus_sha: str
) -> tuple[dict[str, Any], State, dict[str, torch.Tensor]]:
    """The saved counters, the carried state of all streams (on the CPU) and the RNG states, a row per rank."""
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
    rng = {k[4:]: v if v.dim() == 2 else v[None] for k, v in tensors.items() if k.startswith("rng.")}
    size = torch.get_rng_state().numel()
    if "cpu" not in rng or rng["cpu"].dtype != torch.uint8 or rng["cpu"].shape[1:] != (size,):
        raise ResumeError(f"{cfg.state_path} has no valid RNG state (rng.cpu: {size} bytes per process)")
    return info, (tensors["carry.h"], tensors["carry.c"]), rng


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

    Under torchrun each process trains its share of the streams and DDP averages the gradients;
    rank 0 evaluates and writes the files. SIGINT/SIGTERM (or a KeyboardInterrupt) stop the loop;
    what was learnt is saved and evaluated before returning.
    """
    cfg.validate()
    world = World.from_env()
    check_batch_split(cfg.batch_size, world)
    device = world.device(resolve_device(cfg.device))
    with process_group(world, device):
        return _Trainer(cfg, progress, world, device).run()


def check_batch_split(batch_size: int, world: World) -> None:
    """Each process trains batch_size / WORLD_SIZE of the streams: refuse a batch that does not split."""
    if batch_size % world.size:
        below = batch_size - batch_size % world.size
        options = ", ".join(str(b) for b in (below, below + world.size) if b > 0)
        raise TrainConfigError("batch_size", f"batch_size {batch_size} does not split across {world.size} "
                                             f"processes: each trains batch_size / {world.size} streams; use a "
                                             f"multiple of {world.size} (e.g. {options})")


class _Trainer:
    """One run (one process's part of it under torchrun): data, model and optimizer, and the counters
    (`info`) that a resume restores."""

    def __init__(self, cfg: TrainConfig, progress: ProgressFn | None, world: World | None = None,
                 device: torch.device | None = None):
        cfg.validate()
        if cfg.resume and not cfg.state_path.exists():
            raise ResumeError(f"nothing to resume: {cfg.state_path} does not exist; run without --resume to start "
                              "a new run")
        self.cfg, self.progress, self.world = cfg, progress, world or World()
        self.device = device or resolve_device(cfg.device)
        self.metrics_warned = False
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
        world = self.world
        share = cfg.batch_size // world.size  # this process's contiguous rows of the streams
        self.rows = slice(world.rank * share, (world.rank + 1) * share)
        self.model_cfg = ModelConfig(len(self.vocab), cfg.embed, cfg.hidden, cfg.layers, cfg.dropout)
        self.model = CharLSTM(self.model_cfg).to(self.device)
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99)
        )
        shape = (cfg.layers, share, cfg.hidden)
        self.carry: State = (torch.zeros(shape, device=self.device), torch.zeros(shape, device=self.device))
        self.info: dict[str, Any] = {"step": 0, "epoch": 0, "window": 0, "seconds": 0.0, "chars": 0,
                                     "best_val_bpc": math.inf, "best_step": 0, "evaluated_step": -1,
                                     "init_from": None}
        if cfg.init_from:
            self.info["init_from"] = self._start_from(cfg.init_from)
        if world.rank:  # dropout draws differ between the ranks; rank 0 keeps a single process's stream
            _seed_rng(cfg.random_seed, 0, world.rank)
        if cfg.resume:
            self._resume()
        elif world.main:
            Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)  # metrics are appended before the first save
            cfg.metrics_path.unlink(missing_ok=True)
        self.x_all, self.y_all, self.windows = self.streams.epoch(self.info["epoch"], self.rows)
        if world.distributed:
            self._check_ranks_agree()
        # DDP averages the gradients of the ranks' shares: the same step as one process with the whole batch
        self.ddp: torch.nn.Module = self.model
        if world.distributed:
            gpu = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=gpu)

    def _check_ranks_agree(self) -> None:
        """Every rank must have read the same text (each node reads its own copy) and resumed the same state
        (each reads `out`'s sidecar: a stale local copy on one node would silently diverge)."""
        info = self.info
        mine = [int(self.corpus_sha[:15], 16), len(self.vocab), info["step"], info["epoch"], info["window"]]
        ranks = all_rows(torch.tensor([mine], dtype=torch.int64), 0, self.device).tolist()
        if any(row != ranks[0] for row in ranks):
            raise ResumeError(
                "the processes do not agree on their inputs (corpus sha256 prefix, vocabulary size, step, epoch, "
                f"window): {ranks}; every node needs the same corpus and, to resume, the same state file: put "
                "--out on a shared volume"
            )

    def _resume(self) -> None:
        """Restore weights, optimizer, counters, this rank's rows of the carried state and its RNG."""
        cfg, world = self.cfg, self.world
        with input_errors(ResumeError, cfg.state_path, "charlm training state"):
            saved, carry, rng = _load_state(cfg, self.model, self.opt, self.corpus_sha)
            self.carry = (carry[0][:, self.rows].to(self.device), carry[1][:, self.rows].to(self.device))
            saved_size = saved.get("world_size", 1)
            if saved_size == world.size:
                torch.set_rng_state(rng["cpu"][world.rank].clone())  # a row of its own: set_state reads from 0
                if "cuda" in rng and self.device.type == "cuda":
                    torch.cuda.set_rng_state(rng["cuda"][world.rank].clone(), self.device)
        self.info.update({k: saved.get(k, v) for k, v in self.info.items()})
        if saved_size != world.size:
            _seed_rng(cfg.random_seed, self.info["step"], world.rank)
            if world.main:
                log.warning("resuming a run of %d process(es) with %d: the same data, weights and optimizer; dropout "
                            "draws differ from the uninterrupted run", saved_size, world.size)
        if world.main:
            self.rewind_metrics()

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
        self.model.train()
        interrupted = False
        self.meter = (time.perf_counter(), 0)  # (start, characters) of the chars/s reported in the next log row
        with StopSignals() as stop:
            try:
                while not (interrupted := self.agree_to_stop(stop)) and self.progress_fraction() < 1.0:
                    self.train_window()
            except KeyboardInterrupt:
                # From a second signal, the step may be half done: keep the last saved state. Under torchrun,
                # the other ranks are not here (in a collective of their own): leave without one.
                if stop.forced or self.world.distributed:
                    raise
                interrupted = True  # from `progress`, which runs between steps
            if interrupted:  # first the state (fast): a second signal during the evaluation then loses nothing
                self.save_state(self.gather_state())
            if self.info["step"] != self.info["evaluated_step"]:
                self.checkpoint()
            barrier(self.world, self.device)  # no rank leaves (or fails the launcher) while rank 0 still writes
        info = self.info
        return TrainResult(info["step"], info["seconds"], info["best_val_bpc"], interrupted, self.summary())

    def train_window(self) -> None:
        """One optimizer step on the next window, then the log row and evaluation when they are due."""
        cfg, info = self.cfg, self.info
        t0 = time.perf_counter()
        x, y = self.next_window()
        lr = _lr(cfg, info["step"], self.progress_fraction())
        loss = self.step(x, y, lr)
        chars = x.numel() * self.world.size
        info["step"] += 1
        info["window"] += 1
        info["chars"] += chars
        info["seconds"] += time.perf_counter() - t0
        self.meter = (self.meter[0], self.meter[1] + chars)
        if info["step"] % cfg.log_interval == 0:
            loss = self.mean_over_ranks(loss)
            now = time.perf_counter()
            self.log({"step": info["step"], "seconds": round(info["seconds"], 2), "train_bpc": loss.item() / LN2,
                      "lr": lr, "chars_per_s": self.meter[1] / (now - self.meter[0]),
                      "progress": self.progress_fraction()})
            self.meter = (now, 0)
        if info["step"] % cfg.eval_interval == 0:
            t_eval = time.perf_counter()
            self.checkpoint()
            info["seconds"] += time.perf_counter() - t_eval
            self.meter = (time.perf_counter(), 0)

    def agree_to_stop(self, stop: StopSignals) -> bool:
        """Whether to stop now: asked by a signal on any rank. Ranks also adopt the longest clock, so a
        time budget ends on every rank at the same step."""
        if not self.world.distributed:
            return stop.requested
        self.info["seconds"], anyone = all_max([self.info["seconds"], float(stop.requested)], self.device)
        return anyone > 0

    def mean_over_ranks(self, loss: torch.Tensor) -> torch.Tensor:
        return all_sum(loss) / self.world.size if self.world.distributed else loss

    def next_window(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (inputs, targets) window of every stream; a new epoch starts from a zero state."""
        info, seq_len = self.info, self.cfg.seq_len
        if info["window"] >= self.windows:
            info["epoch"], info["window"] = info["epoch"] + 1, 0
            self.x_all, self.y_all, self.windows = self.streams.epoch(info["epoch"], self.rows)
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
            _, state, loss = self.ddp(x, self.carry, y)
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

    def checkpoint(self) -> None:
        """Evaluate every corpus's held-out tail; save the model if the selected corpus's bpc is the best yet,
        and always the resume state and plot. Every rank takes part (the state holds every rank's rows);
        rank 0 alone evaluates and writes, while the others wait in their next collective."""
        self.info["evaluated_step"] = self.info["step"]
        state = self.gather_state()
        if not self.world.main:
            return
        cfg, info = self.cfg, self.info
        results = [evaluate(self.model, ids) for ids in self.val_ids]
        bpc = results[self.selected]["bpc"]
        if bpc < info["best_val_bpc"]:
            info["best_val_bpc"] = bpc
            info["best_step"] = info["step"]
            save_checkpoint(cfg.out, self.model, self.vocab, self.summary())
        self.save_state(state)
        row: dict[str, Any] = {"step": info["step"], "seconds": round(info["seconds"], 2), "val_bpc": bpc}
        if len(results) > 1:
            nats = sum(r["nats"] * r["chars"] for r in results) / sum(r["chars"] for r in results)
            row["val_bpc_all"] = nats / LN2
            row["val_bpc_by_corpus"] = {name: r["bpc"] for name, r in zip(self.data.names, results)}
        self.log(row)
        _plot(cfg, self.read_metrics())

    def gather_state(self) -> dict[str, torch.Tensor]:
        """The carried state of every stream and each rank's RNG, in rank order (a collective under torchrun):
        the carry is laid out as one process's would be, so any number of processes can resume it."""
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        if not self.world.distributed:
            return {"carry.h": self.carry[0], "carry.c": self.carry[1], **{f"rng.{k}": v[None] for k, v in rng.items()}}
        return {"carry.h": all_rows(self.carry[0], 1, self.device), "carry.c": all_rows(self.carry[1], 1, self.device),
                **{f"rng.{k}": all_rows(v[None], 0, self.device) for k, v in rng.items()}}

    def save_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.world.main:
            cfg = self.cfg
            info = {**self.info, "corpus_sha256": self.corpus_sha, "model": self.model_cfg.to_dict(),
                    "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "world_size": self.world.size}
            _save_state(cfg, self.model, self.opt, tensors, info)

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
        if not self.world.main:
            return
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
            "processes": self.world.size,
            "precision": self.precision,
            "val_bpc": round(info["best_val_bpc"], 4),
            "hyperparameters": {k: v for k, v in asdict(cfg).items() if k in hyper},
            "init_from": info["init_from"],
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "version": __version__,
        }
