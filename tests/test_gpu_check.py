"""scripts/gpu_check.py, the prepared GPU check, run as a dry run: on the CPU with --allow-cpu and tiny sizes
(or on the GPU where there is one), its refusal without CUDA, and its watchdog."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"
BATCHES = (4, 8)


def run_check(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The script as the Makefile runs it, from the repo root, in a subprocess of its own."""
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_a_dry_run_writes_a_complete_report(corpus_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    done = run_check("--out", str(out), "--allow-cpu", "--no-tests", "--train-seconds", "3", "--corpus",
                     str(corpus_path), "--batches", ",".join(map(str, BATCHES)), "--decode-length", "40",
                     "--repeats", "2")
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(out.read_text())
    assert report["ok"] is True and "aborted" not in report
    assert report["dry_run"] is (not torch.cuda.is_available())
    assert report["elapsed_s"] > 0
    env = report["environment"]
    assert {"device", "device_name", "torch", "cuda", "git_commit"} <= env.keys()
    assert env["torch"] == torch.__version__ and env["cuda"] == torch.version.cuda
    sections = report["sections"]
    assert set(sections) == {"tests", "train", "decode"}
    assert sections["tests"] == {"ok": True, "ran": False, "note": "skipped by --no-tests"}
    for name in ("train", "decode"):
        assert sections[name]["ok"] is True and "error" not in sections[name]
        assert sections[name]["elapsed_s"] > 0 and sections[name]["budget_s"] > 0

    train = sections["train"]
    assert train["steps"] > 0 and train["chars"] == train["steps"] * train["batch_size"] * train["seq_len"]
    assert train["chars_per_s"] > 0 and train["chars_per_s_median"] > 0
    assert math.isfinite(train["final_val_bpc"]) and isinstance(train["learned"], bool)
    assert not Path(train["checkpoint"]).exists(), "the trained model belongs in a temporary directory"
    assert not list(ROOT.glob("trained*")), "nothing is written into the repository"

    decode = sections["decode"]
    assert decode["length"] == 40 and set(decode["models"]) == {"shipped", "trained"}
    for model in decode["models"].values():
        assert model["ok"] is True and set(model["batches"]) == {str(b) for b in BATCHES}
        for batch, figures in model["batches"].items():
            assert figures["ok"] is True and figures["chars_per_s"] > 0
            assert figures["chars_per_run"] == int(batch) * 40 and len(figures["runs_chars_per_s"]) == 2
            assert figures["mean_rows_per_step"] > 0.9 * int(batch), "the requests were decoded as one batch"
    assert "gpu_check: ok" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available: the check does not refuse")
def test_without_cuda_it_refuses_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    done = run_check("--out", str(out), timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: error: CUDA is not available")
    assert "--allow-cpu" in lines[0]
    assert not out.exists()


def test_the_watchdog_writes_what_it_has_and_exits_3(corpus_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    done = run_check("--out", str(out), "--allow-cpu", "--no-tests", "--corpus", str(corpus_path),
                     "--train-seconds", "30", "--deadline", "1", timeout=60)
    assert done.returncode == 3, done.stderr
    report = json.loads(out.read_text())
    assert report["ok"] is False and "deadline passed during section" in report["aborted"]
    assert "deadline of 1 s passed" in done.stderr
