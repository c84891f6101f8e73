import http.server
import json
import logging
import math
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

import charlm.device
import charlm.train
from charlm.checkpoint import Checkpoint, load_checkpoint, read_safetensors
from charlm.corpus_source import fetch_corpus
from charlm.device import resolve_device
from charlm.evaluate import evaluate
from charlm.model import ModelConfig
from charlm.text import load_corpus, split_text
from charlm.train import ResumeError, TrainState, _Trainer, train
from charlm.train_config import TrainConfig, TrainConfigError
from tests.conftest import make_corpus, tiny_config


def unigram_bits(text: str) -> float:
    counts = Counter(text)
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def test_held_out_loss_falls_well_below_unigram_entropy(tiny_checkpoint_path: Path, corpus_path: Path) -> None:
    ckpt = load_checkpoint(tiny_checkpoint_path)
    _, val = split_text(load_corpus(corpus_path))
    bpc = evaluate(ckpt.model, ckpt.vocab.encode(val))["bpc"]
    assert bpc < 0.6 * unigram_bits(val), (bpc, unigram_bits(val))
    assert ckpt.train["val_bpc"] == pytest.approx(bpc, abs=1e-3)
    assert ckpt.train["steps"] == 150 and ckpt.train["corpus_sha256"]


def test_writes_metrics_and_plot(tiny_checkpoint_path: Path) -> None:
    rows = [json.loads(line) for line in tiny_checkpoint_path.with_suffix(".metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_bpc" in r] == [50, 100, 150]
    assert any("chars_per_s" in r for r in rows)
    assert tiny_checkpoint_path.with_suffix(".loss.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_reaches_the_same_step_position_and_weights(corpus_path: Path, tmp_path: Path) -> None:
    whole = tmp_path / "whole.safetensors"
    train(tiny_config(corpus_path, whole, steps=60, eval_interval=30, dropout=0.1))
    parts = tmp_path / "parts.safetensors"
    train(tiny_config(corpus_path, parts, steps=30, eval_interval=30, dropout=0.1))
    # the schedule is defined by the total, so the first half ran with steps=30: restart its state as 60
    first = tiny_config(corpus_path, parts, steps=60, eval_interval=30, dropout=0.1, resume=True)
    result = train(first)
    assert result.step == 60
    saved = {
        name: json.loads(read_safetensors(p.with_suffix(".state.safetensors"))[1]["charlm.state"])
        for name, p in (("whole", whole), ("parts", parts))
    }
    for key in ("step", "epoch", "window", "chars"):
        assert saved["whole"][key] == saved["parts"][key], key


def test_resume_is_bit_exact_when_the_schedule_matches(corpus_path: Path, tmp_path: Path) -> None:
    whole = tmp_path / "whole.safetensors"
    train(tiny_config(corpus_path, whole, steps=40, eval_interval=20, dropout=0.1))
    part = tmp_path / "part.safetensors"
    cfg = tiny_config(corpus_path, part, steps=40, eval_interval=20, dropout=0.1)

    def stop_after_20(row: dict) -> None:
        if "val_bpc" in row and row["step"] == 20 and not getattr(stop_after_20, "fired", False):
            stop_after_20.fired = True  # type: ignore[attr-defined]
            raise KeyboardInterrupt  # as Ctrl-C would, once

    interrupted = train(cfg, stop_after_20)
    assert interrupted.interrupted and interrupted.step == 20
    cfg.resume = True
    train(cfg)
    a, _ = read_safetensors(whole.with_suffix(".state.safetensors"))
    b, _ = read_safetensors(part.with_suffix(".state.safetensors"))
    for name in a:
        if name.startswith("model."):
            assert torch.allclose(a[name], b[name], atol=1e-6), name


def test_resuming_a_finished_run_evaluates_nothing_again(corpus_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    train(tiny_config(corpus_path, out, steps=20, eval_interval=10))
    rows = out.with_suffix(".metrics.jsonl").read_text()
    result = train(tiny_config(corpus_path, out, steps=20, eval_interval=10, resume=True))
    assert result.step == 20 and out.with_suffix(".metrics.jsonl").read_text() == rows


def test_resume_refuses_another_corpus_or_architecture(corpus_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    train(tiny_config(corpus_path, out, steps=10, eval_interval=10))
    other = tmp_path / "other.txt"
    other.write_text(make_corpus(seed=1))
    with pytest.raises(ResumeError, match="different corpus"):
        train(tiny_config(other, out, steps=20, eval_interval=10, resume=True))
    with pytest.raises(ResumeError, match="architecture"):
        train(tiny_config(corpus_path, out, steps=20, eval_interval=10, hidden=24, resume=True))


STATE_KEYS = {"step", "epoch", "window", "seconds", "chars", "best_val_bpc", "best_step", "evaluated_step",
              "init_from", "corpus_sha256", "model", "batch_size", "seq_len", "world_size", "param_groups"}


def test_old_state_files_resume_as_todays_do(corpus_path: Path, tmp_path: Path) -> None:
    """The state file's JSON keeps its keys; a file from before torchrun (one process: no world_size, rng.cpu
    one unbatched row) and before evaluated_step and init_from resumes exactly as today's file does."""
    new, old = tmp_path / "new.safetensors", tmp_path / "old.safetensors"
    train(tiny_config(corpus_path, new, steps=10, eval_interval=5, dropout=0.1))
    tensors, meta = read_safetensors(new.with_suffix(".state.safetensors"))
    info = json.loads(meta["charlm.state"])
    assert set(info) == STATE_KEYS
    assert TrainState.from_dict(info).to_dict() == {k: info[k] for k in (f.name for f in fields(TrainState))}
    for key in ("world_size", "evaluated_step", "init_from"):
        del info[key]
    tensors["rng.cpu"] = tensors["rng.cpu"][0].contiguous()
    old.with_suffix(".state.safetensors").write_bytes(save(tensors, metadata={"charlm.state": json.dumps(info)}))
    assert TrainState.from_dict(info) == TrainState(step=10, epoch=info["epoch"], window=info["window"],
                                                    seconds=info["seconds"], chars=info["chars"],
                                                    best_val_bpc=info["best_val_bpc"], best_step=info["best_step"])
    results = [train(tiny_config(corpus_path, out, steps=20, eval_interval=5, dropout=0.1, resume=True))
               for out in (new, old)]
    assert [r.step for r in results] == [20, 20] and results[0].best_val_bpc == results[1].best_val_bpc
    a, b = (read_safetensors(out.with_suffix(".state.safetensors"))[0] for out in (new, old))
    assert all(torch.equal(a[name], b[name]) for name in a if name.startswith("model."))
    assert set(json.loads(read_safetensors(old.with_suffix(".state.safetensors"))[1]["charlm.state"])) == STATE_KEYS


def test_init_from_starts_at_the_checkpoint_and_records_it(
    tiny_checkpoint_path: Path, tiny: Checkpoint, corpus_path: Path, tmp_path: Path
) -> None:
    started = tiny.train["val_bpc"]
    out = tmp_path / "tuned.safetensors"
    init = str(tiny_checkpoint_path)
    result = train(tiny_config(corpus_path, out, steps=1, eval_interval=1, lr=1e-6, dropout=0.3, init_from=init))
    assert result.best_val_bpc == pytest.approx(started, abs=0.02)  # a fresh model would be near 4 bpc
    assert result.summary["init_from"]["checkpoint"] == tiny_checkpoint_path.name
    assert result.summary["init_from"]["val_bpc"] == started
    assert load_checkpoint(out).config.dropout == 0.3


def test_init_from_refuses_other_sizes(tiny_checkpoint_path: Path, corpus_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    with pytest.raises(ResumeError, match="sizes"):
        train(tiny_config(corpus_path, out, steps=1, hidden=24, init_from=str(tiny_checkpoint_path)))
    with pytest.raises(ValueError, match="not both"):
        tiny_config(corpus_path, out, steps=1, resume=True, init_from=str(tiny_checkpoint_path))


def test_init_from_across_vocabularies_keeps_the_shared_rows(tiny: Checkpoint, tiny_checkpoint_path: Path,
                                                             tmp_path: Path) -> None:
    other = tmp_path / "other.txt"  # new characters (Z, q, j, x, k, z) and none of the old ones dropped
    other.write_text(make_corpus(seed=3) + "Zebra quartz jukebox!\n")
    out = tmp_path / "m.safetensors"
    trainer = _Trainer(tiny_config(other, out, steps=1, init_from=str(tiny_checkpoint_path)), None)
    old, new = tiny.vocab, trainer.vocab
    added = [c for c in new.chars if c not in old]
    assert added and set(added) <= set("Zebra quartz jukebox!") and all(c in new for c in old.chars)
    theirs, ours = tiny.model.state_dict(), trainer.model.state_dict()
    for c in old.chars:  # every shared character keeps its embedding and output rows
        i, j = old.encode(c).item(), new.encode(c).item()
        for name in ("embedding.weight", "fc.weight", "fc.bias"):
            assert torch.equal(ours[name][j], theirs[name][i]), (c, name)
    fresh = {new.encode(c).item() for c in added}
    assert all(not torch.equal(ours["fc.weight"][j], torch.zeros_like(ours["fc.weight"][j])) for j in fresh)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if k.startswith("lstm."))
    assert trainer.state.init_from is not None and trainer.state.init_from["vocabulary"]["added"] == added
    result = trainer.run()  # and it trains and records where its vocabulary came from
    assert load_checkpoint(out).train["init_from"]["vocabulary"]["kept"] == len(old)
    assert result.step == 1


def test_several_corpora_each_keep_their_held_out_tail(tmp_path: Path) -> None:
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    (shelf / "b.txt").write_text(make_corpus(600, seed=1))
    (shelf / "a.txt").write_text(make_corpus(600, seed=2))
    target = tmp_path / "target.txt"
    target.write_text(make_corpus(900, seed=4))
    out = tmp_path / "m.safetensors"
    cfg = tiny_config(shelf, out, steps=20, eval_interval=10)
    cfg = TrainConfig(**{**cfg.__dict__, "corpus": (str(shelf), str(target))})
    trainer = _Trainer(cfg, None)
    data = trainer.data
    assert data.names == ["a.txt", "b.txt", "target.txt"]  # a directory's files in name order, then the rest
    for corpus, path in zip(data.corpora, [shelf / "a.txt", shelf / "b.txt", target]):
        train_part, val_part = split_text(load_corpus(path), 0.1)
        assert (corpus.train, corpus.val) == (train_part, val_part)
    # The training stream is the training parts only: no held-out character of any corpus is in it.
    assert torch.equal(trainer.streams.ids, torch.cat([data.vocab.encode(c.train) for c in data.corpora]))
    result = trainer.run()
    rows = [json.loads(line) for line in cfg.metrics_path.read_text().splitlines()]
    evals = [r for r in rows if "val_bpc" in r]
    assert evals and all(set(r["val_bpc_by_corpus"]) == set(data.names) for r in evals)
    assert all(r["val_bpc"] == r["val_bpc_by_corpus"]["target.txt"] for r in evals)  # the last corpus picks
    assert min(r["val_bpc"] for r in evals) == pytest.approx(result.best_val_bpc)
    summary = load_checkpoint(out).train
    assert summary["select_on"] == "target.txt"
    assert [c["name"] for c in summary["corpora"]] == data.names
    assert all(c["sha256"] and c["train_chars"] > c["val_chars"] > 0 for c in summary["corpora"])


def test_select_on_names_a_corpus(corpus_path: Path, tmp_path: Path) -> None:
    second = tmp_path / "second.txt"
    second.write_text(make_corpus(900, seed=5))
    base = tiny_config(corpus_path, tmp_path / "m.safetensors", steps=10, eval_interval=10)
    cfg = TrainConfig(**{**base.__dict__, "corpus": (str(corpus_path), str(second)), "select_on": corpus_path.stem})
    result = train(cfg)
    assert result.summary["select_on"] == corpus_path.name
    cfg = TrainConfig(**{**cfg.__dict__, "select_on": "missing"})
    with pytest.raises(ValueError, match="names no corpus.*tiny.txt, second.txt"):
        train(cfg)


def test_curly_quotes_and_italics_reach_the_vocabulary(tmp_path: Path) -> None:
    corpus = tmp_path / "straight.txt"
    corpus.write_text((make_corpus(900) + ' "It\'s _there_," he said. ') * 2)
    trainer = _Trainer(tiny_config(corpus, tmp_path / "m.safetensors", steps=1, quotes="curly"), None)
    assert {"“", "”", "’"} <= set(trainer.vocab.chars) and not {'"', "'", "_"} & set(trainer.vocab.chars)
    assert trainer.summary()["quotes"] == "curly"
    with pytest.raises(TrainConfigError, match="quotes must be one of keep, curly"):
        tiny_config(corpus, tmp_path / "m.safetensors", steps=1, quotes="fancy")


def test_out_may_name_a_folder_that_does_not_exist_yet(corpus_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs" / "new" / "m.safetensors"  # as `--out runs/...` on a fresh clone
    result = train(tiny_config(corpus_path, out, steps=12, eval_interval=12, log_interval=5))
    assert out.exists() and out.with_suffix(".metrics.jsonl").exists() and result.step == 12


def test_a_refused_precision_leaves_the_previous_metrics_alone(corpus_path: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "m.safetensors"
    out.with_suffix(".metrics.jsonl").write_text('{"step": 1}\n')
    monkeypatch.setattr(charlm.device, "cpu_flags", lambda: set())
    with pytest.raises(ValueError, match="bf16 is not native"):
        train(tiny_config(corpus_path, out, steps=1, precision="bf16"))
    assert out.with_suffix(".metrics.jsonl").read_text() == '{"step": 1}\n'


def test_bf16_is_refused_where_the_cpu_would_emulate_it(corpus_path: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(charlm.device, "cpu_flags", lambda: {"avx2", "fma"})
    with pytest.raises(ValueError, match="bf16 is not native on this CPU"):
        train(tiny_config(corpus_path, tmp_path / "m.safetensors", steps=1, precision="bf16"))
    assert charlm.device.resolve_precision("auto", torch.device("cpu")) is None
    monkeypatch.setattr(charlm.device, "cpu_flags", lambda: {"avx512_bf16"})
    result = train(tiny_config(corpus_path, tmp_path / "m.safetensors", steps=2, precision="bf16"))
    assert result.summary["precision"] == "bf16"


def test_url_corpus_is_downloaded_once(corpus_path: Path, tmp_path: Path) -> None:
    hits: list[str] = []
    body = corpus_path.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/files/1268-0.txt"
        first = fetch_corpus(url, tmp_path / "cache")
        second = fetch_corpus(url, tmp_path / "cache")
    finally:
        server.shutdown()
    assert first == second and first.read_bytes() == body and first.name.endswith("1268-0.txt")
    assert hits == ["/files/1268-0.txt"]


@pytest.mark.parametrize(
    "name, value",
    [
        ("warmup_steps", -5), ("steps", 0), ("lr", math.nan), ("lr", -1.0), ("dropout", 1.5), ("min_lr_ratio", 1.5),
        ("grad_clip", 0.0), ("weight_decay", 1.0), ("val_fraction", 0.0), ("log_interval", 0), ("random_seed", -1),
        ("random_seed", 2**63), ("time_budget", math.inf), ("embed", 2.5), ("seq_len", True), ("lr", "0.1"),
    ],
)
def test_config_ranges_hold_for_python_callers_too(name: str, value: object, corpus_path: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainConfigError, match=f"^{name} ") as info:
        tiny_config(corpus_path, tmp_path / "m.safetensors", **{name: value})
    assert info.value.field == name


def test_config_edges_are_allowed(corpus_path: Path, tmp_path: Path) -> None:
    cfg = tiny_config(corpus_path, tmp_path / "m.safetensors", warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0,
                      random_seed=2**63 - 1, dropout=0.0)
    assert cfg.random_seed == 2**63 - 1


def test_model_size_defaults_are_model_configs() -> None:
    ours = {f.name: f.default for f in fields(TrainConfig)}
    for f in fields(ModelConfig):
        if f.name != "vocab_size":
            assert ours[f.name] == f.default, f.name


def test_out_may_not_overwrite_an_input(corpus_path: Path, tiny_checkpoint_path: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainConfigError, match="would overwrite the corpus") as info:
        tiny_config(corpus_path, corpus_path)
    assert info.value.field == "out"
    with pytest.raises(TrainConfigError, match="would overwrite the init_from checkpoint"):
        tiny_config(corpus_path, tiny_checkpoint_path, init_from=str(tiny_checkpoint_path))
    with pytest.raises(TrainConfigError, match="is a directory"):
        tiny_config(corpus_path, tmp_path)
    cfg = tiny_config(corpus_path, tmp_path / "m.safetensors", steps=1)
    cfg.corpus = (str(cfg.metrics_path),)  # changed after construction: checked again when training starts
    with pytest.raises(TrainConfigError, match="would overwrite the corpus .* \\(its metrics file is"):
        train(cfg)


def test_summary_records_the_random_seed_by_its_name(tiny: Checkpoint) -> None:
    hyper = tiny.train["hyperparameters"]
    assert hyper["random_seed"] == 1337 and "seed" not in hyper


def test_resume_without_saved_state_is_refused(corpus_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    with pytest.raises(ResumeError, match="^nothing to resume: .*m.state.safetensors does not exist; run without"):
        train(tiny_config(corpus_path, out, steps=2, resume=True))
    assert not out.exists()


def test_resume_survives_a_damaged_metrics_file(corpus_path: Path, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "m.safetensors"
    train(tiny_config(corpus_path, out, steps=10, eval_interval=5, log_interval=1))
    metrics = out.with_suffix(".metrics.jsonl")
    with metrics.open("a") as f:  # a row logged after the last saved state, garbage, and a kill mid-line
        f.write(json.dumps({"step": 11, "seconds": 1.0, "train_bpc": 3.0}) + "\nnot json\n[1, 2]\n{\"step\": 12, \"sec")
    with caplog.at_level(logging.WARNING, logger="charlm.train"):
        result = train(tiny_config(corpus_path, out, steps=20, eval_interval=5, log_interval=1, resume=True))
    assert result.step == 20
    warnings = [r.getMessage() for r in caplog.records if "not JSON objects" in r.getMessage()]
    assert len(warnings) == 1 and "skipped 3 line(s)" in warnings[0]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line is JSON again
    assert all(isinstance(r, dict) for r in rows)
    assert [r["step"] for r in rows if "train_bpc" in r] == list(range(1, 21))  # step 11 once, from the resumed run
    assert [r["step"] for r in rows if "val_bpc" in r] == [5, 10, 15, 20]


def test_resolve_device_lives_outside_the_trainer() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("tpu")
    assert "resolve_device" not in charlm.train.__all__
    code = "import sys, charlm.device; assert 'charlm.train' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
