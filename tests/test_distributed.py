"""Data-parallel training under torchrun: the real launcher starting real processes (gloo on CPU).

The runs are tiny (2 x 48 LSTM, 8 streams of 32 characters, 20 steps) and compared through the
resume state, which holds the latest weights whatever the held-out score did.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import charlm.train
from charlm import generate, load
from charlm.checkpoint import read_safetensors
from charlm.cli import main
from charlm.distributed import StopSignals, World
from charlm.train import ResumeError, _Trainer, train
from charlm.train_config import TrainConfig, TrainConfigError
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).parent / "torchrun"
WORKER = Path(__file__).with_name("ddp_worker.py")
STEPS = 20
RUN = dict(steps=STEPS, eval_interval=STEPS, log_interval=1)  # one evaluation, at the end


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    """`torchrun --standalone` on this machine, one thread per process, as the README shows it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", str(nproc), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def cli_flags(cfg: TrainConfig) -> list[str]:
    """`charlm train` flags for the settings these tests change."""
    names = ("corpus", "out", "embed", "hidden", "layers", "dropout", "seq_len", "batch_size", "lr", "steps",
             "eval_interval", "log_interval", "warmup_steps", "device")
    flags: list[str] = []
    for name in names:
        value = getattr(cfg, name)
        for v in value if isinstance(value, tuple) else (value,):
            flags += [f"--{name.replace('_', '-')}", str(v)]
    return flags + (["--resume"] if cfg.resume else [])


def worker(cfg: TrainConfig, *extra: str) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    """tests/ddp_worker.py under torchrun; returns the launcher's result and each rank's report."""
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(cfg).items()}
    reports = Path(cfg.out).with_suffix(".reports")
    reports.mkdir()
    proc = torchrun(str(WORKER), json.dumps(fields), "--report", str(reports), *extra)
    return proc, [json.loads(p.read_text()) for p in sorted(reports.glob("rank*.json"))]


def state(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, meta = read_safetensors(out.with_suffix(".state.safetensors"))
    return tensors, json.loads(meta["charlm.state"])


def max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = state(a)[0], state(b)[0]
    names = [k for k in wa if k.startswith("model.")]
    assert names and sorted(names) == sorted(k for k in wb if k.startswith("model."))
    return max((wa[k] - wb[k]).abs().max().item() for k in names)


@pytest.fixture(scope="module")
def two_ranks(corpus_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`torchrun --nproc-per-node 2 -m charlm train --batch-size 8`: 2 ranks of 4 streams, dropout 0."""
    out = tmp_path_factory.mktemp("ddp") / "two.safetensors"
    proc = torchrun("-m", "charlm", "train", *cli_flags(tiny_config(corpus_path, out, **RUN)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stderr


def test_two_ranks_of_four_streams_train_as_one_process_of_eight(two_ranks: tuple[Path, str], corpus_path: Path,
                                                                   tmp_path: Path) -> None:
    out, _ = two_ranks
    one = tmp_path / "one.safetensors"
    train(tiny_config(corpus_path, one, **RUN))
    assert max_weight_difference(out, one) < 1e-5
    (two_state, two_info), (one_state, one_info) = state(out), state(one)
    assert (two_info["world_size"], one_info["world_size"]) == (2, 1)
    assert {k: two_info[k] for k in ("step", "epoch", "window", "chars")} == \
        {k: one_info[k] for k in ("step", "epoch", "window", "chars")}
    # the carried state of all 8 streams, laid out as one process's
    assert torch.allclose(two_state["carry.h"], one_state["carry.h"], atol=1e-5)
    assert two_state["rng.cpu"].shape[0] == 2


def test_only_rank_zero_writes_and_reports(two_ranks: tuple[Path, str]) -> None:
    out, stderr = two_ranks
    rows = [json.loads(line) for line in out.with_suffix(".metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train_bpc" in r]
    assert steps == list(range(1, STEPS + 1))  # one line per step, not one per rank
    assert [r["step"] for r in rows if "val_bpc" in r] == [STEPS]
    assert stderr.count("done: step 20") == 1
    assert out.with_suffix(".loss.png").exists()


def test_a_two_rank_checkpoint_loads_and_generates(two_ranks: tuple[Path, str]) -> None:
    out, _ = two_ranks
    ckpt = load(str(out), "cpu")
    assert ckpt.train["processes"] == 2 and ckpt.train["steps"] == STEPS
    result = generate(ckpt, "The ", length=40, random_seed=3)
    assert len(result.generated) == 40 and set(result.generated) <= set(ckpt.vocab.chars)


def test_an_interrupted_two_rank_run_resumes_exactly(corpus_path: Path, tmp_path: Path) -> None:
    """SIGTERM to the launcher at step 7: every rank stops at one step, rank 0 saves, the launcher exits;
    `--resume` under torchrun then ends where the uninterrupted run does, dropout draws included."""
    settings = dict(RUN, dropout=0.1)
    whole = tmp_path / "whole.safetensors"
    proc, reports = worker(tiny_config(corpus_path, whole, **settings))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(r["rank"], r["step"], r["interrupted"]) for r in reports] == [(0, STEPS, False), (1, STEPS, False)]

    part = tmp_path / "part.safetensors"
    proc, reports = worker(tiny_config(corpus_path, part, **settings), "--signal-launcher-at", "7")
    assert proc.returncode != 0  # torchrun reports the signal it got
    assert [r["rank"] for r in reports] == [0, 1] and all(r["interrupted"] for r in reports)
    pids = {r["pid"] for r in reports}
    assert len(pids) == 2 and os.getpid() not in pids  # processes of their own, not threads
    stopped = reports[0]["step"]
    assert reports[1]["step"] == stopped and 7 <= stopped < STEPS
    assert state(part)[1]["step"] == stopped

    resumed = torchrun("-m", "charlm", "train", *cli_flags(tiny_config(corpus_path, part, resume=True, **settings)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert max_weight_difference(whole, part) < 1e-6
    rows = [json.loads(line) for line in part.with_suffix(".metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in whole.with_suffix(".metrics.jsonl").read_text().splitlines()]

    def losses(rs: list[dict[str, Any]]) -> dict[int, float]:
        return {r["step"]: r["train_bpc"] for r in rs if "train_bpc" in r}

    assert losses(rows) == pytest.approx(losses(expected), abs=1e-6)


def test_ctrl_c_on_the_launcher_stops_every_rank_and_saves(corpus_path: Path, tmp_path: Path) -> None:
    """Ctrl-C reaches only torchrun (its workers run in a session of their own); it passes SIGINT on."""
    out = tmp_path / "m.safetensors"
    proc, reports = worker(tiny_config(corpus_path, out, **RUN), "--signal-launcher-at", "3",
                              "--launcher-signal", "SIGINT")
    assert proc.returncode != 0 and "got signal: 2" in proc.stderr
    assert [(r["rank"], r["interrupted"]) for r in reports] == [(0, True), (1, True)]
    stopped = reports[0]["step"]
    assert reports[1]["step"] == stopped and 3 <= stopped < STEPS
    assert state(out)[1]["step"] == stopped and load(str(out), "cpu").train["steps"] == stopped


def test_a_one_process_run_resumes_with_two(two_ranks: tuple[Path, str], corpus_path: Path, tmp_path: Path) -> None:
    """Another number of processes resumes the same streams and optimizer: with dropout 0, the same run."""
    part = tmp_path / "part.safetensors"

    def interrupt_at_7(row: dict[str, Any]) -> None:
        if row.get("step") == 7 and "train_bpc" in row:
            signal.raise_signal(signal.SIGTERM)

    result = train(tiny_config(corpus_path, part, **RUN), interrupt_at_7)
    assert result.interrupted and result.step == 7  # stopped at the step boundary after the signal
    resumed = torchrun("-m", "charlm", "train", *cli_flags(tiny_config(corpus_path, part, resume=True, **RUN)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming a run of 1 process(es) with 2" in resumed.stderr
    assert max_weight_difference(two_ranks[0], part) < 1e-5


def test_init_from_under_torchrun_matches_one_process(tiny_checkpoint_path: Path, corpus_path: Path,
                                                     tmp_path: Path) -> None:
    """Every rank starts from the checkpoint's weights (DDP also broadcasts rank 0's)."""
    settings = dict(steps=5, eval_interval=5, init_from=str(tiny_checkpoint_path))
    two, one = tmp_path / "two.safetensors", tmp_path / "one.safetensors"
    proc = torchrun("-m", "charlm", "train", *cli_flags(tiny_config(corpus_path, two, **settings)),
                    "--init-from", str(tiny_checkpoint_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    train(tiny_config(corpus_path, one, **settings))
    assert max_weight_difference(two, one) < 1e-5
    assert load(str(two), "cpu").train["init_from"]["checkpoint"] == tiny_checkpoint_path.name


def test_a_batch_that_does_not_split_is_refused_before_any_work(corpus_path: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "m.safetensors"
    cfg = tiny_config(corpus_path, out, batch_size=5, **RUN)
    with pytest.raises(TrainConfigError, match="batch_size 5 does not split across 2 processes.*4, 6"):
        train(cfg)  # no process group was joined: that would wait for a MASTER_ADDR that is not set
    assert main(["train", *cli_flags(cfg)]) == 2
    assert "--batch-size" in capsys.readouterr().err
    assert not out.exists() and not out.with_suffix(".metrics.jsonl").exists()


def test_world_comes_from_torchruns_variables() -> None:
    assert World.from_env({}) == World(0, 1, 0)
    assert World.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == World(3, 4, 1)
    with pytest.raises(ValueError, match="RANK must be in"):
        World.from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="whole numbers"):
        World.from_env({"WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        World(1, 2, 1).device(torch.device("cuda", 0))  # one GPU per process: its LOCAL_RANK's
    assert World(1, 2, 1).device(torch.device("cpu")) == torch.device("cpu")


def test_a_first_signal_asks_to_stop_and_a_second_interrupts() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert not stop.requested
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested
        assert not stop.forced
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        assert stop.forced
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_signal_stops_at_once_and_keeps_the_last_saved_state(corpus_path: Path, tmp_path: Path) -> None:
    """The second signal may land mid-step: nothing is saved then, so the state on disk stays consistent."""
    out = tmp_path / "m.safetensors"

    def twice_at_7(row: dict[str, Any]) -> None:
        if row.get("step") == 7 and "train_bpc" in row:
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(corpus_path, out, steps=STEPS, eval_interval=5, log_interval=1), twice_at_7)
    assert state(out)[1]["step"] == 5  # the last periodic save, not the interrupted step


def test_ranks_that_read_different_inputs_are_refused(corpus_path: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = _Trainer(tiny_config(corpus_path, tmp_path / "m.safetensors", **RUN), None)
    mine = [int(trainer.corpus_sha[:15], 16), len(trainer.vocab), 0, 0, 0]
    other = [mine[0] + 1, *mine[1:]]  # another node's copy of the corpus differs
    monkeypatch.setattr(charlm.train, "all_rows", lambda t, dim, device: torch.tensor([mine, other]))
    with pytest.raises(ResumeError, match="do not agree on their inputs.*shared volume"):
        trainer._check_ranks_agree()
    monkeypatch.setattr(charlm.train, "all_rows", lambda t, dim, device: torch.tensor([mine, mine]))
    trainer._check_ranks_agree()


def test_a_state_with_a_damaged_rng_is_refused(corpus_path: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    out = tmp_path / "m.safetensors"
    train(tiny_config(corpus_path, out, steps=2, eval_interval=2))
    tensors, meta = read_safetensors(out.with_suffix(".state.safetensors"))
    tensors["rng.cpu"] = tensors["rng.cpu"][:, :100].contiguous()
    save_file(tensors, str(out.with_suffix(".state.safetensors")), metadata=meta)
    with pytest.raises(ResumeError, match="no valid RNG state"):
        train(tiny_config(corpus_path, out, steps=4, eval_interval=2, resume=True))
