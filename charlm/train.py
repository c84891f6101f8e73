"""Training: B contiguous streams, truncated BPTT over whole windows, held-out bits per character.

The seed notebook trained on random 40-character windows from a fresh state, one character at a
time in Python. Here each step runs the whole (batch, seq_len) window through nn.LSTM in one call
and carries the LSTM state from window to window (detached), so every character is trained with
its full left context and the matrix multiplies are large.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch.nn import functional as F

from charlm import __version__
from charlm.checkpoint import atomic_write, load_checkpoint, read_safetensors, save_checkpoint
from charlm.model import CharLSTM, ModelConfig, State
from charlm.text import load_corpus, split_text
from charlm.vocab import Vocab

__all__ = ["TrainConfig", "TrainResult", "ResumeError", "train", "evaluate", "resolve_device"]

LN2 = math.log(2.0)


class ResumeError(ValueError):
    """The saved training state does not belong to this corpus or architecture."""


@dataclass
class TrainConfig:
    corpus: str  # path of the UTF-8 training text (URLs are fetched by the CLI before this)
    out: str  # checkpoint path; the best model by held-out bpc is kept here
    embed: int = 128
    hidden: int = 512
    layers: int = 2
    dropout: float = 0.25
    seq_len: int = 128  # characters per window (truncated BPTT length)
    batch_size: int = 64  # contiguous streams trained side by side
    lr: float = 3e-3  # peak AdamW learning rate, reached after warmup, then cosine to lr * min_lr_ratio
    min_lr_ratio: float = 0.02
    warmup_steps: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    steps: int | None = None  # stop after this many optimizer steps …
    time_budget: float | None = None  # … or after this many seconds (the schedule follows whichever ends first)
    eval_interval: int = 100  # steps between held-out evaluations (and checkpoint/state saves)
    log_interval: int = 10  # steps between metrics.jsonl lines
    val_fraction: float = 0.1
    device: str = "auto"
    seed: int = 1337
    strip: bool = True  # cut the Gutenberg licence header/footer
    resume: bool = False
    init_from: str | None = None  # start from this checkpoint's weights (same vocabulary and sizes)
    corpus_name: str | None = None  # what to record as the corpus (e.g. its URL); defaults to the path

    def __post_init__(self) -> None:
        positive = ("embed", "hidden", "layers", "seq_len", "batch_size", "eval_interval", "log_interval")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.steps is None and self.time_budget is None:
            raise ValueError("give steps or time_budget (or both)")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"time_budget must be > 0 seconds, got {self.time_budget}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.resume and self.init_from:
            raise ValueError("give resume or init_from, not both: a resumed run already has its weights")

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


@dataclass
class TrainResult:
    step: int
    seconds: float
    best_val_bpc: float
    interrupted: bool
    summary: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: str) -> torch.device:
    """'auto' → CUDA when present, else CPU; 'cuda:N' is checked to exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {device!r} requested but CUDA is not available here")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return dev


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

    def __init__(self, ids: torch.Tensor, batch: int, seq_len: int, seed: int):
        if len(ids) < batch * (seq_len + 1) + seq_len:
            raise ValueError(
                f"training text of {len(ids)} characters is too short for batch_size={batch} x "
                f"seq_len={seq_len}; lower them or use a longer corpus"
            )
        self.ids, self.batch, self.seq_len, self.seed = ids, batch, seq_len, seed

    def epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(inputs, targets) as (B, L) streams for this epoch, and its number of windows."""
        offset = int(torch.randint(self.seq_len, (1,), generator=torch.Generator().manual_seed(self.seed + epoch)))
        length = (len(self.ids) - 1 - offset) // self.batch
        x = self.ids[offset : offset + self.batch * length].view(self.batch, length)
        y = self.ids[offset + 1 : offset + 1 + self.batch * length].view(self.batch, length)
        return x, y, length // self.seq_len


def _lr(cfg: TrainConfig, step: int, progress: float) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * warm * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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


def _plot(cfg: TrainConfig) -> None:
    """Training loss and held-out bpc against wall-clock time, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in cfg.metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["seconds"] / 60, r["train_bpc"]) for r in rows if "train_bpc" in r]
    val = [(r["seconds"] / 60, r["val_bpc"]) for r in rows if "val_bpc" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="training bpc (with dropout)", alpha=0.6)
    if val:
        ax.plot(*zip(*val), "o-", label="held-out bpc")
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel("bits per character")
    ax.set_title(Path(cfg.out).name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(cfg.plot_path, dpi=100)
    plt.close(fig)


ProgressFn = Callable[[dict[str, Any]], None]


def train(cfg: TrainConfig, progress: ProgressFn | None = None) -> TrainResult:
    """Train (or resume) and keep the best checkpoint by held-out bpc at `cfg.out`.

    A KeyboardInterrupt stops the loop; what was learnt is evaluated and saved before returning.
    """
    return _Trainer(cfg, progress).run()


class _Trainer:
    """One run: data, model and optimizer, and the counters (`info`) that a resume restores."""

    def __init__(self, cfg: TrainConfig, progress: ProgressFn | None):
        self.cfg, self.progress = cfg, progress
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        text = load_corpus(cfg.corpus, strip=cfg.strip)
        self.train_text, self.val_text = split_text(text, cfg.val_fraction)
        self.vocab = Vocab.from_text(text)
        self.corpus_sha = sha256_text(text)
        self.val_ids = self.vocab.encode(self.val_text)
        self.streams = _Streams(self.vocab.encode(self.train_text), cfg.batch_size, cfg.seq_len, cfg.seed)
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
        if cfg.resume and cfg.state_path.exists():
            saved, self.carry = _load_state(cfg, self.model, self.opt, self.device, self.corpus_sha)
            self.info.update({k: saved.get(k, v) for k, v in self.info.items()})
        elif not cfg.resume:
            cfg.metrics_path.unlink(missing_ok=True)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        self.x_all, self.y_all, self.windows = self.streams.epoch(self.info["epoch"])

    def _start_from(self, path: str) -> dict[str, Any]:
        """Load a trained checkpoint's weights (same vocabulary and sizes; dropout and schedule are
        this run's) and return what the new checkpoint records about it."""
        ckpt = load_checkpoint(path, self.device)
        if ckpt.vocab.chars != self.vocab.chars:
            raise ResumeError(f"cannot start from {path}: its vocabulary differs from this corpus's")
        sizes = ("vocab_size", "embed", "hidden", "layers")
        theirs, ours = ckpt.config.to_dict(), self.model_cfg.to_dict()
        if any(theirs[k] != ours[k] for k in sizes):
            raise ResumeError(
                f"cannot start from {path}: its sizes {[theirs[k] for k in sizes]} differ from this run's "
                f"{[ours[k] for k in sizes]} (vocab_size, embed, hidden, layers)"
            )
        self.model.load_state_dict(ckpt.model.state_dict())
        return {"checkpoint": Path(path).name, "config": theirs,
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
        """Evaluate; save the model if it is the best yet, and always the resume state and plot."""
        cfg, info = self.cfg, self.info
        result = evaluate(self.model, self.val_ids)
        if result["bpc"] < info["best_val_bpc"]:
            info["best_val_bpc"] = result["bpc"]
            info["best_step"] = info["step"]
            save_checkpoint(cfg.out, self.model, self.vocab, self.summary())
        state_info = {**info, "corpus_sha256": self.corpus_sha, "model": self.model_cfg.to_dict(),
                      "batch_size": cfg.batch_size, "seq_len": cfg.seq_len}
        _save_state(cfg, self.model, self.opt, self.carry, state_info)
        self.log({"step": info["step"], "seconds": round(info["seconds"], 2), "val_bpc": result["bpc"]})
        _plot(cfg)
        return result["bpc"]

    def log(self, row: dict[str, Any]) -> None:
        with self.cfg.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.progress:
            self.progress(row)

    def summary(self) -> dict[str, Any]:
        """The training record kept in the checkpoint's metadata."""
        cfg, info = self.cfg, self.info
        hyper = ("seq_len", "batch_size", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip", "seed")
        return {
            "corpus": cfg.corpus_name or Path(cfg.corpus).name,
            "corpus_sha256": self.corpus_sha,
            "strip_gutenberg": cfg.strip,
            "val_fraction": cfg.val_fraction,
            "train_chars": len(self.train_text),
            "val_chars": len(self.val_text),
            "steps": info["step"],
            "epochs": round(info["chars"] / len(self.train_text), 2),
            "seconds": round(info["seconds"], 1),
            "device": str(self.device),
            "val_bpc": round(info["best_val_bpc"], 4),
            "hyperparameters": {k: v for k, v in asdict(cfg).items() if k in hyper},
            "init_from": info["init_from"],
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "version": __version__,
        }
