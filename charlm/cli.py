"""`charlm train | eval | generate | serve`: the command line over the library.

Usage errors exit 2, failures exit 1, and both print one clear line instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value}")
    return x


def _positive_float(value: str) -> float:
    x = _float(value)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return x


def _fraction(value: str) -> float:
    x = _positive_float(value)
    if x >= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return x


def _fraction_or_one(value: str) -> float:
    x = _positive_float(value)
    if x > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return x


def _dropout(value: str) -> float:
    x = _float(value)
    if not 0 <= x < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return x


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train a model on a text file or URL")
    p.add_argument("--corpus", required=True, help="UTF-8 text file, or an http(s):// URL (downloaded once)")
    p.add_argument("--out", required=True, help="checkpoint path (.safetensors); the best model is kept here")
    p.add_argument("--layers", type=_positive_int, default=2)
    p.add_argument("--hidden", type=_positive_int, default=512)
    p.add_argument("--embed", type=_positive_int, default=128)
    p.add_argument("--dropout", type=_dropout, default=0.25)
    p.add_argument("--seq-len", type=_positive_int, default=128)
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--lr", type=_positive_float, default=3e-3)
    p.add_argument("--weight-decay", type=_dropout, default=0.05, help="AdamW weight decay, in [0, 1)")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--steps", type=_positive_int, help="optimizer steps to run")
    p.add_argument("--time-budget", type=_positive_float, metavar="SECONDS", help="stop after this long")
    p.add_argument("--eval-interval", type=_positive_int, default=100, help="steps between evaluations")
    p.add_argument("--val-fraction", type=_fraction, default=0.1)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--resume", action="store_true", help="continue from the saved training state")
    p.add_argument("--init-from", metavar="CHECKPOINT",
                   help="start from this checkpoint's weights (same corpus vocabulary and sizes; new schedule)")
    p.add_argument("--no-strip", action="store_true", help="keep the Gutenberg header and footer")
    p.add_argument("--cache-dir", help="where downloaded corpora are kept (default ~/.cache/charlm)")


def _cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from charlm.corpus_source import fetch_corpus
    from charlm.train import TrainConfig, train

    if args.steps is None and args.time_budget is None:
        raise argparse.ArgumentTypeError("give --steps or --time-budget")
    if args.resume and args.init_from:
        raise argparse.ArgumentTypeError("give --resume or --init-from, not both")
    path = fetch_corpus(args.corpus, args.cache_dir)
    cfg = TrainConfig(
        corpus=str(path), out=args.out, embed=args.embed, hidden=args.hidden, layers=args.layers,
        dropout=args.dropout, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, steps=args.steps,
        time_budget=args.time_budget, eval_interval=args.eval_interval, val_fraction=args.val_fraction,
        device=args.device, seed=args.seed, strip=not args.no_strip, resume=args.resume,
        init_from=args.init_from, corpus_name=args.corpus,
    )
    by_time = args.steps is None
    bar = tqdm(total=int(args.time_budget) if by_time else args.steps, unit="s" if by_time else "step",
               dynamic_ncols=True, file=sys.stderr)
    shown: dict[str, Any] = {}

    def progress(row: dict[str, Any]) -> None:
        if "train_bpc" in row:
            shown.update(loss=f"{row['train_bpc']:.3f}", chars_s=f"{row['chars_per_s']:.0f}")
        if "val_bpc" in row:
            shown["val_bpc"] = f"{row['val_bpc']:.4f}"
        bar.n = min(int(row["seconds"]) if by_time else row["step"], bar.total)
        bar.set_postfix(shown, refresh=True)

    result = train(cfg, progress)
    bar.close()
    note = "interrupted; saved" if result.interrupted else "done"
    print(f"{note}: step {result.step}, {result.seconds:.0f} s, best held-out {result.best_val_bpc:.4f} bpc "
          f"-> {args.out}", file=sys.stderr)
    return 130 if result.interrupted else 0


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="held-out bits per character of a checkpoint on a corpus")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--corpus", required=True, help="UTF-8 text file or http(s):// URL")
    p.add_argument("--split", choices=["val", "all"], default="val",
                   help="val: the held-out part the trainer used (default); all: the whole text")
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir")


def _cmd_eval(args: argparse.Namespace) -> int:
    from charlm import evaluate_text, load
    from charlm.corpus_source import fetch_corpus
    from charlm.text import load_corpus, split_text

    ckpt = load(args.checkpoint, args.device)
    strip = ckpt.train.get("strip_gutenberg", True)
    text = load_corpus(fetch_corpus(args.corpus, args.cache_dir), strip=strip)
    if args.split == "val":
        text = split_text(text, ckpt.train.get("val_fraction", 0.1))[1]
    result = evaluate_text(ckpt, text)
    print(json.dumps({"bpc": round(result["bpc"], 5), "nats": round(result["nats"], 5),
                      "chars": result["chars"], "split": args.split}))
    return 0


def _add_generate(sub: Any) -> None:
    p = sub.add_parser("generate", help="continue a seed text")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--seed", required=True, help="start text; every character must be in the vocabulary")
    p.add_argument("--length", type=_positive_int, default=500)
    p.add_argument("--scale-factor", type=_positive_float, default=1.0, help="logit multiplier (1/temperature)")
    p.add_argument("--top-k", type=_positive_int)
    p.add_argument("--top-p", type=_fraction_or_one)
    p.add_argument("--random-seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="end at this string (repeatable, up to 4)")
    p.add_argument("--device", default="auto")


def _cmd_generate(args: argparse.Namespace) -> int:
    from charlm import generate, load

    ckpt = load(args.checkpoint, args.device)
    result = generate(ckpt, args.seed, length=args.length, scale_factor=args.scale_factor, top_k=args.top_k,
                      top_p=args.top_p, random_seed=args.random_seed, stop=tuple(args.stop))
    print(result.text)
    print(f"[{result.finish_reason}; random_seed {result.random_seed}; "
          f"{result.timings['chars_per_s']:.0f} chars/s]", file=sys.stderr)
    return 0


def _add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over HTTP (settings also from CHARLM_* variables)")
    p.add_argument("--checkpoint", help="default: $CHARLM_CHECKPOINT or the shipped model")
    p.add_argument("--host", help="default: $CHARLM_HOST or 127.0.0.1")
    p.add_argument("--port", type=int, help="default: $CHARLM_PORT or 8000")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: $CHARLM_DEVICE or auto)")


def _cmd_serve(args: argparse.Namespace) -> int:
    """Load the checkpoint first, so a bad one fails in one line instead of a server traceback."""
    import logging

    from charlm.checkpoint import load_checkpoint
    from charlm.train import resolve_device

    try:
        from app.server import serve
        from app.settings import Settings
    except ImportError as exc:
        raise OSError(f"the HTTP service is not installed ({exc}); install charlm with its dependencies") from None
    overrides = {k: v for k, v in vars(args).items() if k in ("checkpoint", "host", "port", "device") and v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    checkpoint = load_checkpoint(settings.checkpoint, resolve_device(settings.device))
    serve(settings, checkpoint)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="charlm", description="Character-level LSTM language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_generate(sub)
    _add_serve(sub)
    return parser


_COMMANDS = {"train": _cmd_train, "eval": _cmd_eval, "generate": _cmd_generate, "serve": _cmd_serve}


def _sigterm(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    from charlm.errors import USAGE_ERRORS

    try:
        return _COMMANDS[args.command](args)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    except USAGE_ERRORS as exc:
        print(f"charlm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"charlm {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"charlm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
