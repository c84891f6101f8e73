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
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save
from torch.nn.parallel import DistributedDataParallel

from charlm import __version__
from charlm.checkpoint import CheckpointError, load_checkpoint, read_safetensors, save_checkpoint
from charlm.corpora import CorpusSet, load_corpora
from charlm.device import resolve_device, resolve_precision
from charlm.distributed import StopSignals, World, all_max, all_rows, all_sum, barrier, process_group
from charlm.evaluate import LN2, evaluate_many
from charlm.files import atomic_write
from charlm.inputs import input_errors
from charlm.model import CharLSTM, ModelConfig, State
from charlm.train_config import TrainConfig, TrainConfigError

__all__ = ["TrainState", "TrainResult", "ResumeError", "train", "check_batch_split"]

log = logging.getLogger(__name__)


class ResumeError(ValueError):
    """The saved training state is missing, or does not belong to this corpus or architecture."""


@dataclass
class TrainResult:
    step: int
    seconds: float
    best_val_bpc: float
    interrupted: bool
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainState:
    """Where a run stands: the counters and records that a resume restores. Saved as JSON (`charlm.state` in
    <out>.state.safetensors) beside what the run must match to resume it (corpus, model, batch)."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # passes over the training text begun (each starts at a fresh random offset)
    window: int = 0  # windows of this epoch already trained
    seconds: float = 0.0  # spent training and evaluating, summed over resumed parts
    chars: int = 0  # characters trained on, all processes together
    best_val_bpc: float = math.inf  # the selected corpus's best held-out bpc: the saved checkpoint's
    best_step: int = 0  # … and the step it was reached at
    evaluated_step: int = -1  # the last step evaluated (-1: none), so a finished run is not evaluated again
    init_from: dict[str, Any] | None = None  # what the run started from (--init-from), or None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> TrainState:
        """The state saved by to_dict; older files lack later fields (they keep their defaults) and the
        file's other keys (the run's identity) are not counters."""
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})


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
    `run` holds the carried state (carry.h, carry.c) and each rank's RNG (rng.cpu, rng.cuda: a row each);
    `info`, the TrainState and the run's identity (corpus_sha256, model, batch_size, seq_len, world_size)."""
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
) -> tuple[TrainState, int, State, dict[str, torch.Tensor]]:
    """The saved TrainState, the number of processes that saved it (1 in files from before torchrun), the
    carried state of all streams (on the CPU) and the RNG states, a row per rank."""
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
    return TrainState.from_dict(info), info.get("world_size", 1), (tensors["carry.h"], tensors["carry.c"]), rng


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
    """One run (one process's part of it under torchrun): data, model and optimizer, and where the run stands
    (`state`, a TrainState) that a resume restores."""

    def __init__(self, cfg: TrainConfig, progress: ProgressFn | None, world: World | None = None,
                 device: torch.device | None = None):
        cfg.validate()
        if cfg.resume and not cfg.state_path.exists():
            raise ResumeError(f"nothing to resume: {cfg.state_path} does not exist; run without --resume to start "
                              "a new run")
        self.cfg, self.progress, self.world = cfg, progress, world or World()
        self.device = device or resolve_device(cfg.device)
        self.metrics_warned = False
        self.stop: StopSignals | None = None  # the run's signals, while it runs
        self.tail_results: tuple[int, dict[int, dict[str, float]]] = (-1, {})  # (step, figures of the tails
        # evaluated at that step, by corpus index): what a second evaluation at the same step need not repeat
        self.partial_step = -1  # the step of the last evaluation that left corpora out (-1: none)
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
        self.state = TrainState()
        if cfg.init_from:
            self.state.init_from = self._start_from(cfg.init_from)
        if world.rank:  # dropout draws differ between the ranks; rank 0 keeps a single process's stream
            _seed_rng(cfg.random_seed, 0, world.rank)
        if cfg.resume:
            self._resume()
        elif world.main:
            Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)  # metrics are appended before the first save
            cfg.metrics_path.unlink(missing_ok=True)
        self.x_all, self.y_all, self.windows = self.streams.epoch(self.state.epoch, self.rows)
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
        state = self.state
        mine = [int(self.corpus_sha[:15], 16), len(self.vocab), state.step, state.epoch, state.window]
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
            self.state, saved_size, carry, rng = _load_state(cfg, self.model, self.opt, self.corpus_sha)
            mine = (carry[0][:, self.rows], carry[1][:, self.rows])
            if saved_size == world.size:
                torch.set_rng_state(rng["cpu"][world.rank].clone())  # a row of its own: set_state reads from 0
                if "cuda" in rng and self.device.type == "cuda":
                    torch.cuda.set_rng_state(rng["cuda"][world.rank].clone(), self.device)
        self.carry = (mine[0].to(self.device), mine[1].to(self.device))  # a device error is not a damaged file
        if saved_size != world.size:
            _seed_rng(cfg.random_seed, self.state.step, world.rank)
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
            ckpt = load_checkpoint(path)  # on the CPU: its weights are copied into this run's model
        sizes = ("embed", "hidden", "layers")
        theirs, ours = ckpt.config.to_dict(), self.model_cfg.to_dict()
        if any(theirs[k] != ours[k] for k in sizes):
            raise ResumeError(
                f"cannot start from {path}: its sizes {[theirs[k] for k in sizes]} differ from this run's "
                f"{[ours[k] for k in sizes]} (embed, hidden, layers)"
            )
        old, new = ckpt.vocab, self.vocab
        shared = [c for c in new.chars if c in old]
        theirs_sd = ckpt.model.state_dict()
        state = {k: v for k, v in theirs_sd.items() if k not in _VOCAB_ROWS}
        fresh = self.model.state_dict()
        with torch.no_grad():
            to, frm = new.encode("".join(shared)).to(self.device), old.encode("".join(shared))
            for name in _VOCAB_ROWS:
                rows = fresh[name].clone()
                rows[to] = theirs_sd[name][frm].to(self.device)
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
            self.stop = stop
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
            if self.state.step != self.state.evaluated_step:
                self.checkpoint(every_corpus=True)
            elif self.world.main and self.partial_step == self.state.step:
                self.log_evaluation(self.evaluate_tails(every_corpus=True))  # a run ends on every corpus's figure
            self.stop = None
            barrier(self.world, self.device)  # no rank leaves (or fails the launcher) while rank 0 still writes
        state = self.state
        return TrainResult(state.step, state.seconds, state.best_val_bpc, interrupted, self.summary())

    def train_window(self) -> None:
        """One optimizer step on the next window, then the log row and evaluation when they are due."""
        cfg, state = self.cfg, self.state
        t0 = time.perf_counter()
        x, y = self.next_window()
        lr = _lr(cfg, state.step, self.progress_fraction())
        loss = self.step(x, y, lr)
        chars = x.numel() * self.world.size
        state.step += 1
        state.window += 1
        state.chars += chars
        state.seconds += time.perf_counter() - t0
        self.meter = (self.meter[0], self.meter[1] + chars)
        if state.step % cfg.log_interval == 0:
            loss = self.mean_over_ranks(loss)
            now = time.perf_counter()
            self.log({"step": state.step, "seconds": round(state.seconds, 2), "train_bpc": loss.item() / LN2,
                      "lr": lr, "chars_per_s": self.meter[1] / (now - self.meter[0]),
                      "progress": self.progress_fraction()})
            self.meter = (now, 0)
        if state.step % cfg.eval_interval == 0:
            t_eval = time.perf_counter()
            last = self.progress_fraction() >= 1.0 or (self.stop is not None and self.stop.requested)
            self.checkpoint(every_corpus=last or self.evaluates_every_corpus())
            state.seconds += time.perf_counter() - t_eval
            self.meter = (time.perf_counter(), 0)

    def agree_to_stop(self, stop: StopSignals) -> bool:
        """Whether to stop now: asked by a signal on any rank. Ranks also adopt the longest clock, so a
        time budget ends on every rank at the same step."""
        if not self.world.distributed:
            return stop.requested
        self.state.seconds, anyone = all_max([self.state.seconds, float(stop.requested)], self.device)
        return anyone > 0

    def mean_over_ranks(self, loss: torch.Tensor) -> torch.Tensor:
        return all_sum(loss) / self.world.size if self.world.distributed else loss

    def next_window(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (inputs, targets) window of every stream; a new epoch starts from a zero state."""
        state, seq_len = self.state, self.cfg.seq_len
        if state.window >= self.windows:
            state.epoch, state.window = state.epoch + 1, 0
            self.x_all, self.y_all, self.windows = self.streams.epoch(state.epoch, self.rows)
            self.carry = (torch.zeros_like(self.carry[0]), torch.zeros_like(self.carry[1]))
        s = state.window * seq_len
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
            fractions.append(self.state.step / self.cfg.steps)
        if self.cfg.time_budget:
            fractions.append(self.state.seconds / self.cfg.time_budget)
        return max(fractions)

    def evaluates_every_corpus(self) -> bool:
        """Whether this step's evaluation covers every corpus (the selected one is in every evaluation): the
        first, then every eval_all_every-th. Counted from the step, so a resumed run keeps the same ones."""
        number = self.state.step // self.cfg.eval_interval  # 1 at the first evaluation
        return (number - 1) % self.cfg.eval_all_every == 0

    def checkpoint(self, every_corpus: bool = True) -> None:
        """Evaluate the selected corpus's held-out tail (every corpus's with `every_corpus`); save the model if
        the selected corpus's bpc is the best yet, and always the resume state and plot. Every rank takes part
        (the state holds every rank's rows); rank 0 alone evaluates and writes, while the others wait in their
        next collective."""
        self.state.evaluated_step = self.state.step
        tensors = self.gather_state()
        if not self.world.main:
            return
        cfg, state = self.cfg, self.state
        results = self.evaluate_tails(every_corpus)
        bpc = results[self.selected]["bpc"]
        if bpc < state.best_val_bpc:
            state.best_val_bpc = bpc
            state.best_step = state.step
            save_checkpoint(cfg.out, self.model, self.vocab, self.summary())
        self.save_state(tensors)
        self.log_evaluation(results)

    def evaluate_tails(self, every_corpus: bool) -> dict[int, dict[str, float]]:
        """The held-out figures of the selected corpus (of every corpus with `every_corpus`) at this step, by
        corpus index. The tails run side by side (evaluate_many: each figure is `charlm eval`'s for that
        tail); those already evaluated at this step are not evaluated again."""
        step = self.state.step
        if self.tail_results[0] != step:
            self.tail_results = (step, {})
        done = self.tail_results[1]
        wanted = list(range(len(self.val_ids))) if every_corpus else [self.selected]
        todo = [i for i in wanted if i not in done]
        done.update(zip(todo, evaluate_many(self.model, [self.val_ids[i] for i in todo])))
        self.partial_step = step if len(wanted) < len(self.val_ids) else -1
        return {i: done[i] for i in wanted}

    def log_evaluation(self, results: dict[int, dict[str, float]]) -> None:
        """The metrics row of an evaluation, and the plot. With several corpora, `val_bpc_by_corpus` names those
        evaluated this time (the others are left out, not repeated from an older step) and `val_bpc_all`, of
        every corpus, is there only when every corpus was evaluated."""
        state, names = self.state, self.data.names
        row: dict[str, Any] = {"step": state.step, "seconds": round(state.seconds, 2),
                               "val_bpc": results[self.selected]["bpc"]}
        if len(names) > 1:
            if len(results) == len(names):
                nats = sum(r["nats"] * r["chars"] for r in results.values()) / sum(r["chars"] for r in results.values())
                row["val_bpc_all"] = nats / LN2
            row["val_bpc_by_corpus"] = {names[i]: results[i]["bpc"] for i in sorted(results)}
        self.log(row)
        _plot(self.cfg, self.read_metrics())

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
            info = {**self.state.to_dict(), "corpus_sha256": self.corpus_sha, "model": self.model_cfg.to_dict(),
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
        step = self.state.step
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
        cfg, state = self.cfg, self.state
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
            "steps": state.step,
            "epochs": round(state.chars / data.train_chars(), 2),
            "seconds": round(state.seconds, 1),
            "device": str(self.device),
            "processes": self.world.size,
            "precision": self.precision,
            "val_bpc": round(state.best_val_bpc, 4),
            "hyperparameters": {k: v for k, v in asdict(cfg).items() if k in hyper},
            "init_from": state.init_from,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "version": __version__,
        }
