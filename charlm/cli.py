"""`charlm train | eval | generate | quantize | serve`: the command line over the library.

Usage errors exit 2, failures exit 1, and both print one line, `charlm <command>: error: ...`,
instead of a traceback (charlm/exit_codes.py says which error is which).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import MISSING, fields
from typing import TYPE_CHECKING, Any

from charlm.formats import ISAS, WEIGHT_FORMATS

if TYPE_CHECKING:
    from charlm.sampling import SamplingParams
    from charlm.train_config import Option, TrainConfig

__all__ = ["main"]

SERVE_OPTIONS = ("models", "checkpoint", "default_model", "host", "port", "device", "weights", "kernels")
KERNELS = ("auto", *ISAS)  # forwarded to `python -m app`


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None


def _positive_int(value: str) -> int:
    n = _int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _number(value: str) -> float:
    """A number, any number: its range is SamplingParams' to check (charlm.sampling is their one home)."""
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None


def _checked(kind: type, option: Option) -> Callable[[str], Any]:
    """An argparse `type` that parses a number and applies the TrainConfig field's own range check."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            expected = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        problem = option.problem(value, kind)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def _flag(name: str, option: Option) -> str:
    return option.flag or "--" + name.replace("_", "-")


def _add_train(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, with the field's default, type and range: the dataclass is the one
    home of training defaults, so the CLI cannot drift from what Python callers get."""
    from charlm.train_config import TrainConfig, field_types, option_of

    types = field_types()
    for f in fields(TrainConfig):
        option = option_of(f)
        if option is None or not option.cli:
            continue
        kind, doc = types[f.name], option.doc.replace("%", "%%")
        flag, required = _flag(f.name, option), f.default is MISSING
        if kind is bool:
            p.add_argument(flag, dest=f.name, action="store_false" if f.default else "store_true", help=doc)
            continue
        if kind in (int, float) and (option.low is not None or option.high is not None):
            doc += f"; {option.describe()}"
        if not required and f.default is not None:
            doc += " (default: %(default)s)"
        extra: dict[str, Any] = {"action": "append"} if option.many else {}
        if option.choices:
            extra["choices"] = option.choices
        p.add_argument(flag, dest=f.name, type=_checked(kind, option) if kind in (int, float) else kind,
                       default=None if required else f.default, required=required, metavar=option.metavar,
                       help=doc, **extra)
    p.add_argument("--cache-dir", help="where downloaded corpora are kept (default ~/.cache/charlm)")


def _train_config(args: argparse.Namespace, corpus: list[str]) -> TrainConfig:
    """TrainConfig from the parsed flags; its own refusals (e.g. --out naming the corpus) become usage errors
    that name the flag."""
    from charlm.train_config import TrainConfig, TrainConfigError, option_of

    options = {f.name: option_of(f) for f in fields(TrainConfig)}
    values = {name: getattr(args, name) for name, option in options.items() if option and option.cli}
    try:
        return TrainConfig(**{**values, "corpus": tuple(corpus), "corpus_names": tuple(args.corpus)})
    except TrainConfigError as exc:
        option = options.get(exc.field)
        flag = _flag(exc.field, option) if option else exc.field
        raise argparse.ArgumentTypeError(f"argument {flag}: {exc}") from None


def _cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from charlm.corpus_source import fetch_corpus
    from charlm.distributed import World
    from charlm.train import check_batch_split, train
    from charlm.train_config import TrainConfigError

    if args.steps is None and args.time_budget is None:
        raise argparse.ArgumentTypeError("give --steps or --time-budget")
    if args.resume and args.init_from:
        raise argparse.ArgumentTypeError("give --resume or --init-from, not both")
    try:
        check_batch_split(args.batch_size, World.from_env())  # under torchrun; before any download
    except TrainConfigError as exc:
        raise argparse.ArgumentTypeError(f"argument --batch-size: {exc}") from None
    paths = [str(fetch_corpus(source, args.cache_dir)) for source in args.corpus]
    cfg = _train_config(args, paths)
    by_time = args.steps is None
    bar: Any = None
    shown: dict[str, Any] = {}

    def progress(row: dict[str, Any]) -> None:
        """The bar appears with the first row, so that loading messages and errors never share its line."""
        nonlocal bar
        if bar is None:
            bar = tqdm(total=int(args.time_budget) if by_time else args.steps, unit="s" if by_time else "step",
                       dynamic_ncols=True, file=sys.stderr)
        if "train_bpc" in row:
            shown.update(loss=f"{row['train_bpc']:.3f}", chars_s=f"{row['chars_per_s']:.0f}")
        if "val_bpc" in row:
            shown["val_bpc"] = f"{row['val_bpc']:.4f}"
        bar.n = min(int(row["seconds"]) if by_time else row["step"], bar.total)
        bar.set_postfix(shown, refresh=True)

    try:
        result = train(cfg, progress)
    finally:
        if bar is not None:
            bar.close()  # ends the bar's line: an error printed next starts on its own line
    note = "interrupted; saved" if result.interrupted else "done"
    if World.from_env().main:  # under torchrun, rank 0 evaluated and wrote: it alone reports
        print(f"{note}: step {result.step}, {result.seconds:.0f} s, best held-out {result.best_val_bpc:.4f} bpc "
              f"-> {args.out}", file=sys.stderr)
    return 130 if result.interrupted else 0


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--corpus", required=True, help="UTF-8 text file or http(s):// URL")
    p.add_argument("--split", choices=["val", "all"], default="val",
                   help="val: the held-out part the trainer used (default); all: the whole text")
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir")
    p.add_argument("--weights", choices=WEIGHT_FORMATS, help="evaluate the decode path in this weight format "
                   "instead of nn.LSTM in fp32, and print its cost against fp32 decode weights")
    p.add_argument("--kernels", choices=KERNELS, default="auto", help="the decode kernels' code path")


def _cmd_eval(args: argparse.Namespace) -> int:
    from charlm import evaluate_text, load
    from charlm.corpus_source import fetch_corpus
    from charlm.inputs import input_errors
    from charlm.text import CorpusError, load_corpus, split_text

    ckpt = load(args.checkpoint, "cpu" if args.weights else args.device)  # the decode kernels run on the CPU
    strip = ckpt.train.get("strip_gutenberg", True)
    path = fetch_corpus(args.corpus, args.cache_dir)
    with input_errors(CorpusError, path, "UTF-8 text corpus"):
        text = load_corpus(path, strip=strip, quotes=ckpt.train.get("quotes", "keep"))  # as the model was trained
    if args.split == "val":
        text = split_text(text, ckpt.train.get("val_fraction", 0.1))[1]
    if args.weights is None:
        result = evaluate_text(ckpt, text)
        print(json.dumps({"bpc": round(result["bpc"], 5), "nats": round(result["nats"], 5),
                          "chars": result["chars"], "split": args.split}))
        return 0
    _use_kernels(args.kernels)
    decoded = evaluate_text(ckpt, text, weights=args.weights)
    reference = evaluate_text(ckpt, text, weights="fp32") if args.weights != "fp32" else decoded
    print(json.dumps({"bpc": round(decoded["bpc"], 5), "weights": args.weights,
                      "cost_bpc": round(decoded["bpc"] - reference["bpc"], 5), "fp32_bpc": round(reference["bpc"], 5),
                      "chars": decoded["chars"], "split": args.split}))
    return 0


def _use_kernels(isa: str) -> None:
    """Force the decode kernels' code path (a CPU that lacks it is a usage error naming what it lacks)."""
    from charlm import native

    kernels = native.load()
    if kernels is not None:
        kernels.use(isa)
    elif isa != "auto":
        raise native.UnsupportedISA(f"--kernels {isa} needs charlm._native, which is not built: use auto")


def _add_generate(p: argparse.ArgumentParser) -> None:
    from charlm.request import DEFAULT_LENGTH

    p.add_argument("--checkpoint", required=True)
    p.add_argument("--seed", required=True, help="start text; every character must be in the vocabulary")
    p.add_argument("--length", type=_positive_int, default=DEFAULT_LENGTH,
                   help="characters to generate (default: %(default)s)")
    # Their ranges are SamplingParams' (the library's and the service's too): _sampling checks them.
    p.add_argument("--scale-factor", type=_number, default=1.0, help="logit multiplier (1/temperature)")
    p.add_argument("--top-k", type=_int, help="keep only the k most likely characters")
    p.add_argument("--top-p", type=_number, help="keep the most likely characters up to this probability")
    p.add_argument("--random-seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="end at this string (repeatable, up to 4)")
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", choices=WEIGHT_FORMATS,
                   help="decode weight format (default: the checkpoint's, else fp32)")
    p.add_argument("--kernels", choices=KERNELS, default="auto", help="the decode kernels' code path")


def _sampling(args: argparse.Namespace) -> SamplingParams:
    """The sampling flags as SamplingParams, which checks their ranges; a refusal names the flag."""
    from charlm.sampling import InvalidParameter, SamplingParams

    try:
        return SamplingParams(scale_factor=args.scale_factor, top_k=args.top_k, top_p=args.top_p)
    except InvalidParameter as exc:
        raise argparse.ArgumentTypeError(f"argument --{exc.field.replace('_', '-')}: {exc.message}") from None


def _cmd_generate(args: argparse.Namespace) -> int:
    from charlm import generate, load

    sampling = _sampling(args)  # before the checkpoint is loaded: a bad flag fails at once
    ckpt = load(args.checkpoint, args.device)
    _use_kernels(args.kernels)
    result = generate(ckpt, args.seed, weights=args.weights, length=args.length, scale_factor=sampling.scale_factor,
                      top_k=sampling.top_k, top_p=sampling.top_p, random_seed=args.random_seed,
                      stop=tuple(args.stop))
    print(result.text)
    print(f"[{result.finish_reason}; random_seed {result.random_seed}; "
          f"{result.timings.chars_per_s:.0f} chars/s]", file=sys.stderr)
    return 0


def _add_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", help="directories of *.safetensors and/or id=path pairs, comma-separated "
                   "(default: $CHARLM_MODELS or the shipped models/)")
    p.add_argument("--checkpoint", help="serve this one model file (default: $CHARLM_CHECKPOINT)")
    p.add_argument("--default-model", help="the model requests without `model` get")
    p.add_argument("--host", help="default: $CHARLM_HOST or 127.0.0.1")
    p.add_argument("--port", type=int, help="default: $CHARLM_PORT or 8000")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: $CHARLM_DEVICE or auto)")
    p.add_argument("--weights", choices=WEIGHT_FORMATS, help="decode weight format of every model (default: "
                   "$CHARLM_WEIGHTS, else each checkpoint's own)")
    p.add_argument("--kernels", choices=KERNELS, help="the decode kernels' code path (default: $CHARLM_KERNELS "
                   "or auto)")


def _add_quantize(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--weights", choices=WEIGHT_FORMATS, required=True, help="the decode weight format to serve it in")
    p.add_argument("--out", required=True, help="the checkpoint to write (not the input)")


def _cmd_quantize(args: argparse.Namespace) -> int:
    """Check that the weights can be held in the format and write a copy that asks for it: the file keeps
    the fp32 weights (long seeds and scoring run in fp32), the decode weights are packed at load."""
    from pathlib import Path

    from charlm import load
    from charlm.checkpoint import save_checkpoint
    from charlm.decoder import Decoder
    from charlm.native import load as load_kernels

    if Path(args.out).resolve() == Path(args.checkpoint).resolve():
        raise argparse.ArgumentTypeError("argument --out: it is the input checkpoint; write the copy elsewhere")
    ckpt = load(args.checkpoint, "cpu")
    kernels = load_kernels()
    fp32 = Decoder(ckpt.model, 1, kernels).weight_bytes
    packed = Decoder(ckpt.model, 1, kernels, args.weights).weight_bytes  # raises WeightsError, naming the layer
    save_checkpoint(args.out, ckpt.model, ckpt.vocab, ckpt.train, weights=args.weights)
    print(json.dumps({"out": args.out, "weights": args.weights, "decode_weight_bytes": packed,
                      "fp32_decode_weight_bytes": fp32}))
    return 0


def _serve_argv(args: argparse.Namespace) -> list[str]:
    """`python -m app` with the options that were given (the others keep the service's own defaults)."""
    forwarded = [part for name in SERVE_OPTIONS if getattr(args, name) is not None
                 for part in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]
    return [sys.executable, "-m", "app", *forwarded]


def _cmd_serve(args: argparse.Namespace) -> int:
    """Replace this process with the service's own entry point: the library never imports app/ (the
    service checks and loads the checkpoint, and reports a bad one in one line)."""
    argv = _serve_argv(args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
    return 0  # not reached: execv returns only by raising OSError


_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "train": ("train a model on a text file or URL (on several processes: under torchrun)", _add_train, _cmd_train),
    "eval": ("held-out bits per character of a checkpoint on a corpus", _add_eval, _cmd_eval),
    "generate": ("continue a seed text", _add_generate, _cmd_generate),
    "quantize": ("write a copy of a checkpoint that is decoded in bf16 or int8", _add_quantize, _cmd_quantize),
    "serve": ("serve models over HTTP (settings also from CHARLM_* variables)", _add_serve, _cmd_serve),
}


def _parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser, with options only for the command being run: train's and generate's defaults come from the
    library, whose import (PyTorch, ~1.5 s) `charlm serve` and `charlm --help` need not pay for."""
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(prog="charlm", description="Character-level LSTM language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (doc, add, _) in _COMMANDS.items():
        p = sub.add_parser(name, help=doc, description=doc)
        if name == chosen:
            add(p)
    return parser


def _sigterm(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser(argv).parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        return _COMMANDS[args.command][2](args)
    except KeyboardInterrupt:
        print(f"charlm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from charlm.exit_codes import exit_code
        from charlm.inputs import one_line

        code = exit_code(exc)
        if code is None:
            raise  # a bug, not a bad input: keep the traceback
        print(f"charlm {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
