"""`charlm` commands: outputs, exit codes (2 usage, 1 failure) and one-line errors."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save

import charlm
from charlm import cli
from charlm.checkpoint import CheckpointError, load_checkpoint
from charlm.cli import main
from charlm.exit_codes import exit_code
from charlm.inputs import one_line
from charlm.model import CharLSTM, ModelConfig
from charlm.request import DEFAULT_LENGTH, RequestError
from charlm.train_config import TrainConfig
from tests.conftest import make_corpus

SMALL = ["--layers", "1", "--hidden", "16", "--embed", "8", "--seq-len", "16", "--batch-size", "4", "--device", "cpu"]


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(args)
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_is_reproducible(tiny_checkpoint_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", "--checkpoint", str(tiny_checkpoint_path), "--seed", "The ", "--length", "200",
            "--scale-factor", "2.0", "--device", "cpu"]
    outputs = {seed: run([*args, "--random-seed", seed], capsys) for seed in ("1", "2")}
    again = run([*args, "--random-seed", "1"], capsys)
    assert outputs["1"][0] == 0 and outputs["1"][1].startswith("The ")
    assert again[1] == outputs["1"][1]
    assert outputs["2"][1] != outputs["1"][1]
    top = run([*args, "--random-seed", "1", "--top-k", "1"], capsys)
    assert top[0] == 0 and len(top[1]) >= 200


def test_eval_prints_one_json_line(tiny_checkpoint_path: Path, corpus_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["eval", "--checkpoint", str(tiny_checkpoint_path), "--corpus", str(corpus_path),
                        "--device", "cpu"], capsys)
    result = json.loads(out)
    assert code == 0 and result["split"] == "val" and 0 < result["bpc"] < 4
    assert result["nats"] == pytest.approx(result["bpc"] * 0.693147, rel=1e-3)
    code, out, _ = run(["eval", "--checkpoint", str(tiny_checkpoint_path), "--corpus", str(corpus_path),
                        "--split", "all", "--device", "cpu"], capsys)
    assert json.loads(out)["chars"] > 9 * result["chars"]


def test_train_command_writes_checkpoint(corpus_path: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.safetensors"
    code, _, err = run(["train", "--corpus", str(corpus_path), "--out", str(out), "--layers", "1", "--hidden", "16",
                        "--embed", "8", "--seq-len", "16", "--batch-size", "4", "--steps", "6",
                        "--eval-interval", "3", "--device", "cpu"], capsys)
    assert code == 0 and out.exists() and "best held-out" in err
    assert out.with_suffix(".metrics.jsonl").exists() and out.with_suffix(".loss.png").exists()


def test_train_takes_several_corpora_and_eval_reads_text_as_the_model_was_trained(
    corpus_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    (shelf / "one.txt").write_text(make_corpus(400, seed=7).replace("The", '"The').replace(".", '."'))
    out = tmp_path / "m.safetensors"
    code, _, err = run(["train", "--corpus", str(shelf), "--corpus", str(corpus_path), "--out", str(out),
                        "--quotes", "curly", "--select-on", "one", "--layers", "1", "--hidden", "16", "--embed", "8",
                        "--seq-len", "16", "--batch-size", "4", "--steps", "4", "--eval-interval", "2",
                        "--device", "cpu"], capsys)
    assert code == 0, err
    summary = load_checkpoint(out).train
    assert [c["name"] for c in summary["corpora"]] == ["one.txt", corpus_path.name]
    assert summary["select_on"] == "one.txt" and summary["quotes"] == "curly"
    # The straight quotes of the shelf file are curled for eval too, as in training: no unknown characters.
    code, result, err = run(["eval", "--checkpoint", str(out), "--corpus", str(shelf / "one.txt"),
                             "--device", "cpu"], capsys)
    assert code == 0 and json.loads(result)["bpc"] > 0, err
    code, _, err = run(["train", "--corpus", str(corpus_path), "--out", str(out), "--steps", "2",
                        "--quotes", "fancy"], capsys)
    assert code == 2 and "--quotes" in err and "curly" in err


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["generate", "--checkpoint", "{ckpt}", "--seed", "The €"], 2, "'€'"),
        (["generate", "--checkpoint", "{ckpt}", "--seed", "The", "--scale-factor", "0"], 2, "scale-factor"),
        (["generate", "--checkpoint", "{ckpt}", "--seed", "The", "--length", "-3"], 2, "length"),
        (["generate", "--checkpoint", "{missing}", "--seed", "The"], 1, "not found"),
        (["eval", "--checkpoint", "{ckpt}", "--corpus", "{missing}"], 1, "not found"),
        (["train", "--corpus", "{corpus}", "--out", "{out}", "--lr", "-1", "--steps", "2"], 2, "lr"),
        (["train", "--corpus", "{corpus}", "--out", "{out}"], 2, "--steps or --time-budget"),
        (["train", "--corpus", "{corpus}", "--out", "{out}", "--steps", "2", "--resume", "--init-from", "{ckpt}"], 2,
         "not both"),
        (["train", "--corpus", "{corpus}", "--out", "{out}", "--steps", "2", "--hidden", "8", "--init-from", "{ckpt}"],
         1, "differ"),
        (["train", "--corpus", "{corpus}", "--out", "{out}", "--steps", "2", "--device", "tpu"], 1, "device"),
        (["train", "--corpus", "{empty}", "--out", "{out}", "--steps", "2"], 1, "empty"),
        (["train", "--corpus", "{single}", "--out", "{out}", "--steps", "2"], 1, "one distinct character"),
        (["train", "--corpus", "{latin1}", "--out", "{out}", "--steps", "2"], 1, "not UTF-8"),
        (["generate", "--checkpoint", "{latin1}", "--seed", "The"], 1, "not a readable safetensors"),
    ],
)
def test_errors_exit_with_one_clear_line(args: list[str], code: int, message: str, tiny_checkpoint_path: Path,
                                         corpus_path: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "single.txt").write_text("zzzzzz")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    paths = {"ckpt": tiny_checkpoint_path, "missing": tmp_path / "missing", "corpus": corpus_path,
             "out": tmp_path / "o.safetensors", "empty": tmp_path / "empty.txt",
             "single": tmp_path / "single.txt", "latin1": tmp_path / "latin1.txt"}
    argv = [a.format(**{k: str(v) for k, v in paths.items()}) for a in args]
    if argv[0] == "generate":
        argv += ["--device", "cpu"]
    got, _, err = run(argv, capsys)
    assert got == code, err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "flag, value, limit",
    [
        ("--scale-factor", "1e9", "<= 10000"), ("--scale-factor", "0", "> 0"), ("--scale-factor", "nan", "finite"),
        ("--top-k", "0", "between 1 and 1114112"), ("--top-k", str(2**40), "between 1 and 1114112"),
        ("--top-p", "1.5", "(0, 1]"),
    ],
)
def test_generate_sampling_limits_are_the_librarys(flag: str, value: str, limit: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """SamplingParams (charlm/sampling.py) checks the sampling flags, before the checkpoint is even read."""
    code, _, err = run(["generate", "--checkpoint", str(tmp_path / "none.safetensors"), "--seed", "The", flag, value,
                        "--device", "cpu"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"charlm generate: error: argument {flag}: must be ") and limit in lines[0]


def test_a_device_out_of_memory_is_not_reported_as_a_damaged_checkpoint(
    tiny_checkpoint_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only reading the file is guarded (a crash there means a damaged file); moving the model onto the device
    comes after, so CUDA running out of memory propagates as itself."""
    real_to = torch.nn.Module.to

    def to(self: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        if args and isinstance(args[0], torch.device) and args[0].type == "cuda":
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(CharLSTM, "to", to)
    monkeypatch.setattr("charlm.device.resolve_device", lambda device: torch.device("cuda", 0))
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        charlm.load(str(tiny_checkpoint_path), "cuda")
    with pytest.raises(RuntimeError, match="CUDA out of memory"):  # a failure of this machine: not exit 1
        main(["generate", "--checkpoint", str(tiny_checkpoint_path), "--seed", "The", "--device", "cuda"])
    assert "cannot read" not in capsys.readouterr().err


@pytest.mark.parametrize("module", ["charlm.cli", "charlm"])
def test_console_script_exit_status_from_a_real_process(module: str, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", module, "generate", "--checkpoint",
                             str(tmp_path / "none.safetensors"), "--seed", "x"], capture_output=True, text=True)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"charlm generate: error: checkpoint not found: {tmp_path / 'none.safetensors'}")


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--warmup-steps", "-5"), ("--steps", "0"), ("--lr", "nan"), ("--lr", "inf"), ("--dropout", "1.5"),
        ("--random-seed", "-1"), ("--random-seed", str(2**63)), ("--random-seed", "x"), ("--min-lr-ratio", "1.5"),
        ("--grad-clip", "0"), ("--weight-decay", "1"), ("--val-fraction", "0"), ("--val-fraction", "1"),
        ("--log-interval", "0"), ("--eval-interval", "0"), ("--embed", "0"), ("--batch-size", "2.5"),
        ("--time-budget", "-1"), ("--time-budget", "inf"),
    ],
)
def test_train_refuses_out_of_range_numbers_naming_the_option(
    flag: str, value: str, corpus_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.safetensors"
    code, _, err = run(["train", "--corpus", str(corpus_path), "--out", str(out), "--steps", "2", flag, value], capsys)
    assert code == 2, err
    assert f"argument {flag}:" in err and "Traceback" not in err
    assert not out.exists()


def test_train_flag_defaults_are_trainconfig_defaults() -> None:
    args = cli._parser(["train"]).parse_args(["train", "--corpus", "c.txt", "--out", "m.safetensors"])
    for f in fields(TrainConfig):
        if f.default is not MISSING and f.name != "corpus_names":
            assert getattr(args, f.name) == f.default, f.name
    model = {f.name: f.default for f in fields(ModelConfig) if f.default is not MISSING}
    assert {k: getattr(args, k) for k in model} == model
    assert not hasattr(args, "seed") and args.random_seed == 1337


def test_generate_length_default_is_the_engines() -> None:
    args = cli._parser(["generate"]).parse_args(["generate", "--checkpoint", "m", "--seed", "x"])
    assert args.length == DEFAULT_LENGTH


@pytest.mark.parametrize("link", ["same", "symlink", "hardlink", "sidecar", "init_from"])
def test_train_refuses_an_out_that_would_overwrite_an_input(link: str, corpus_path: Path, tiny_checkpoint_path: Path,
                                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(corpus_path.read_bytes())
    extra: list[str] = []
    if link == "same":
        out = corpus
    elif link == "symlink":
        out = tmp_path / "alias.safetensors"
        out.symlink_to(corpus)
    elif link == "hardlink":
        out = tmp_path / "twin.safetensors"
        os.link(corpus, out)
    elif link == "sidecar":  # the metrics file of m.safetensors is m.metrics.jsonl
        corpus = corpus.rename(tmp_path / "m.metrics.jsonl")
        out = tmp_path / "m.safetensors"
    else:
        out = tmp_path / "init.safetensors"
        out.write_bytes(tiny_checkpoint_path.read_bytes())
        extra = ["--init-from", str(tmp_path / "." / "init.safetensors")]
    before = corpus.read_bytes(), out.read_bytes() if out.exists() else None
    code, _, err = run(["train", "--corpus", str(corpus), "--out", str(out), "--steps", "2", *SMALL, *extra], capsys)
    assert code == 2, err
    assert err.startswith("charlm train: error: argument --out:") and "would overwrite" in err
    assert (corpus.read_bytes(), out.read_bytes() if out.exists() else None) == before


def test_train_error_starts_on_its_own_line_after_the_progress_bar(
    corpus_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(*_args: object) -> None:
        raise OSError("disk full\nwhile writing the plot")

    monkeypatch.setattr("charlm.train._plot", disk_full)
    out = tmp_path / "m.safetensors"
    code, _, err = run(["train", "--corpus", str(corpus_path), "--out", str(out), "--steps", "4",
                        "--eval-interval", "2", "--log-interval", "1", *SMALL], capsys)
    assert code == 1
    assert "step" in err  # the bar was shown before the error
    lines = err.split("\n")
    assert "charlm train: error: disk full while writing the plot" in lines, err


def test_train_resume_without_saved_state_is_refused(corpus_path: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.safetensors"
    code, _, err = run(["train", "--corpus", str(corpus_path), "--out", str(out), "--steps", "2", "--resume", *SMALL],
                       capsys)
    assert code == 1
    assert err.strip().splitlines() == [
        f"charlm train: error: nothing to resume: {out.with_suffix('.state.safetensors')} does not exist; "
        "run without --resume to start a new run"
    ]


def _hostile_checkpoint(path: Path, kind: str) -> Path:
    """A safetensors file with charlm metadata that crashes parsers rather than failing their checks."""
    meta = {"charlm.format": "1", "charlm.vocab": '["a", "b"]', "charlm.model": '{"vocab_size": 2}'}
    if kind == "recursion":
        meta["charlm.vocab"] = "[" * 200_000 + "]" * 200_000
    else:
        meta["charlm.model"] = '{"vocab_size": 2, "embed": 2.5}'
    path.write_bytes(save({}, metadata=meta))
    return path


@pytest.mark.parametrize("kind", ["recursion", "type"])
@pytest.mark.parametrize("command", ["generate", "eval", "train"])
def test_a_hostile_checkpoint_fails_in_one_line(kind: str, command: str, corpus_path: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    bad = str(_hostile_checkpoint(tmp_path / "bad.safetensors", kind))
    argv = {
        "generate": ["generate", "--checkpoint", bad, "--seed", "ab", "--device", "cpu"],
        "eval": ["eval", "--checkpoint", bad, "--corpus", str(corpus_path), "--device", "cpu"],
        "train": ["train", "--corpus", str(corpus_path), "--out", str(tmp_path / "m.safetensors"), "--steps", "1",
                  "--init-from", bad, *SMALL],
    }[command]
    code, _, err = run(argv, capsys)
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"charlm {command}: error: ") and bad in lines[0], err


def test_serve_forwards_only_the_given_options_to_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, list[str]]] = []

    def fake_execv(path: str, argv: list[str]) -> None:
        calls.append((path, list(argv)))
        raise SystemExit(0)  # execv never returns

    monkeypatch.setattr(os, "execv", fake_execv)
    for argv, forwarded in [
        (["serve"], []),
        (["serve", "--port", "9000", "--checkpoint", "m.safetensors"],
         ["--checkpoint", "m.safetensors", "--port", "9000"]),
        (["serve", "--host", "0.0.0.0", "--device", "cpu"], ["--host", "0.0.0.0", "--device", "cpu"]),
    ]:
        with pytest.raises(SystemExit):
            main(argv)
        assert calls.pop() == (sys.executable, [sys.executable, "-m", "app", *forwarded])


def test_serve_help_works_without_loading_the_library() -> None:
    code = ("import sys; from charlm.cli import main\n"
            "try:\n    main(['serve', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "assert 'torch' not in sys.modules and 'app' not in sys.modules, 'serve --help imported torch or app'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--checkpoint" in result.stdout and "--port" in result.stdout


def test_exit_codes_and_one_line_messages() -> None:
    assert importlib.util.find_spec("charlm.errors") is None  # renamed to charlm.exit_codes
    assert exit_code(RequestError("length", "must be >= 1")) == 2
    assert exit_code(CheckpointError("broken")) == 1 and exit_code(FileNotFoundError("x")) == 1
    assert exit_code(KeyError("bug")) is None  # a bug keeps its traceback
    assert one_line(ValueError("first\r\n  second\nthird")) == "first second third"
    assert one_line(MemoryError()) == "MemoryError"


@pytest.mark.parametrize("error", [RecursionError, TypeError, MemoryError, RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("command", ["generate", "eval", "train"])
def test_crashes_while_loading_inputs_end_in_one_line(error: type[BaseException], command: str, corpus_path: Path,
                                                      tiny_checkpoint_path: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Whatever a parser raises on a damaged file is reported as that file's error; Ctrl-C stays Ctrl-C."""

    def crash(*_args: object, **_kwargs: object) -> None:
        raise error("deep\ninside")

    target = {"generate": "charlm.checkpoint.load_checkpoint", "eval": "charlm.text.load_corpus",
              "train": "charlm.corpora.load_corpus"}[command]
    monkeypatch.setattr(target, crash)
    ckpt, corpus = str(tiny_checkpoint_path), str(corpus_path)
    argv = {
        "generate": ["generate", "--checkpoint", ckpt, "--seed", "The", "--device", "cpu"],
        "eval": ["eval", "--checkpoint", ckpt, "--corpus", corpus, "--device", "cpu"],
        "train": ["train", "--corpus", corpus, "--out", str(tmp_path / "m.safetensors"), "--steps", "1", *SMALL],
    }[command]
    code, _, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    if error is KeyboardInterrupt:
        assert (code, lines[0]) == (130, f"charlm {command}: interrupted")
    else:
        path = ckpt if command == "generate" else corpus
        assert code == 1
        assert lines[0].startswith(f"charlm {command}: error: cannot read ") and path in lines[0]
        assert f"{error.__name__}: deep inside" in lines[0]
