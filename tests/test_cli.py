"""`charlm` commands: outputs, exit codes (2 usage, 1 failure) and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from charlm.cli import main


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


def test_console_script_exit_status_from_a_real_process(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "charlm.cli", "generate", "--checkpoint",
                             str(tmp_path / "none.safetensors"), "--seed", "x"], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"charlm generate: error: checkpoint not found: "
                                                  f"{tmp_path / 'none.safetensors'}"]
