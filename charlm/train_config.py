"""A training run's settings: TrainConfig, whose fields carry their own help text and allowed range.

The dataclass is the one home of every training default and range: it validates itself, and the command
line builds `charlm train`'s flags from the same metadata (Option), so the two cannot drift apart.
"""

from __future__ import annotations

import math
import os
import typing
from dataclasses import MISSING, Field, dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

from charlm.device import PRECISIONS
from charlm.model import ModelConfig
from charlm.typography import QUOTE_STYLES

__all__ = ["TrainConfig", "TrainConfigError", "Option", "option_of", "field_types", "MAX_TRAIN_RANDOM_SEED"]

MAX_TRAIN_RANDOM_SEED = 2**63 - 1  # torch seeds are 64-bit; the data order adds the epoch number to it


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
    eval_all_every: int = _field(4, doc="with several corpora, evaluate every corpus's held-out tail at the first "
                                        "evaluation, every Nth after it and the last; the others evaluate only "
                                        "the selected corpus, which picks the checkpoint (1: every corpus each "
                                        "time)", low=1, metavar="N")
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
