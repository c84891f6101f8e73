import json
import os
import pickle
import re
import resource
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from charlm import checkpoint as checkpoint_module
from charlm import files
from charlm.checkpoint import CheckpointError, load_checkpoint, read_safetensors, save_checkpoint
from charlm.files import atomic_write
from charlm.model import CharLSTM, ModelConfig
from charlm.vocab import Vocab


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[Path, CharLSTM, Vocab]:
    vocab = Vocab.from_text("abcdef ")
    model = CharLSTM(ModelConfig(vocab_size=len(vocab), embed=4, hidden=8, layers=2))
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, vocab, {"val_bpc": 1.5})
    return path, model, vocab


def test_round_trip(saved: tuple[Path, CharLSTM, Vocab]) -> None:
    path, model, vocab = saved
    ckpt = load_checkpoint(path)
    assert ckpt.vocab == vocab and ckpt.config == model.config and ckpt.train == {"val_bpc": 1.5}
    for name, tensor in model.state_dict().items():
        assert torch.equal(ckpt.model.state_dict()[name], tensor)


def test_standard_names_load_into_plain_modules(saved: tuple[Path, CharLSTM, Vocab]) -> None:
    from safetensors import safe_open

    path, _, vocab = saved
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    assert meta["charlm.format"] == "1" and json.loads(meta["charlm.vocab"]) == list(vocab.chars)
    lstm = torch.nn.LSTM(4, 8, num_layers=2)
    lstm.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("lstm.")})
    torch.nn.Embedding(len(vocab), 4).load_state_dict({"weight": tensors["embedding.weight"]})
    torch.nn.Linear(8, len(vocab)).load_state_dict({"weight": tensors["fc.weight"], "bias": tensors["fc.bias"]})


def test_a_crash_mid_save_leaves_the_old_file(saved: tuple[Path, CharLSTM, Vocab], monkeypatch) -> None:
    path, model, vocab = saved
    before = path.read_bytes()

    def crash(*_args: object) -> None:
        raise OSError("disk vanished")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, model, vocab, {"val_bpc": 0.1})
    assert path.read_bytes() == before
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_truncated_file_is_refused(saved: tuple[Path, CharLSTM, Vocab]) -> None:
    path, _, _ = saved
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"hello world, not a model", os.urandom(4096)])
def test_garbage_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_pickle_renamed_safetensors_is_refused_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "evil.safetensors"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(path)
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_foreign_safetensors_without_metadata_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(CheckpointError, match="not a charlm checkpoint"):
        load_checkpoint(path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.safetensors")


# --- hardening: file writing -------------------------------------------------------------------------------------


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_saved_file_honours_the_umask(saved: tuple[Path, CharLSTM, Vocab]) -> None:
    path, model, vocab = saved
    for umask, mode in ((0o022, 0o644), (0o027, 0o640)):
        old = os.umask(umask)
        try:
            save_checkpoint(path, model, vocab)
        finally:
            os.umask(old)
        assert path.stat().st_mode & 0o777 == mode, f"umask {umask:03o}"



def test_umask_is_read_without_proc_too(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_proc(*_args: object, **_kwargs: object) -> None:
        raise FileNotFoundError("/proc/self/status")

    old = os.umask(0o027)
    try:
        assert files.current_umask() == 0o027
        monkeypatch.setattr(files, "open", no_proc, raising=False)
        assert files.current_umask() == 0o027
        assert os.umask(0o027) == 0o027  # and it is left as it was
    finally:
        os.umask(old)


def test_temp_file_names_the_writer_pid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        seen.append(Path(src).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    atomic_write(tmp_path / "x.bin", b"data")
    assert len(seen) == 1 and seen[0].startswith(".x.bin.") and f".{os.getpid()}." in seen[0]
    assert seen[0].endswith(".tmp") and (tmp_path / "x.bin").read_bytes() == b"data"


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "m.safetensors"
    dead, alive = _dead_pid(), os.getpid()
    stale = tmp_path / (files._temp_prefix(target, dead) + "abc123_x.tmp")
    live = tmp_path / (files._temp_prefix(target, alive) + "def456_y.tmp")
    other_target = tmp_path / (files._temp_prefix(tmp_path / "other.bin", dead) + "ghi789_z.tmp")
    other_host = tmp_path / f".m.safetensors.another-container-1.{dead}.jkl012_w.tmp"
    for p in (stale, live, other_target, other_host):
        p.write_bytes(b"partial")
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert not stale.exists()  # its writer is gone: litter
    assert live.exists() and other_target.exists() and other_host.exists()  # not ours to judge


def test_corpus_cache_uses_the_shared_atomic_write() -> None:
    from charlm import checkpoint, corpus_source

    assert corpus_source.atomic_write is files.atomic_write is checkpoint.atomic_write


# --- hardening: reading ------------------------------------------------------------------------------------------


def test_unreadable_file_says_permission_denied(saved: tuple[Path, CharLSTM, Vocab]) -> None:
    path, _, _ = saved
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):  # root (with CAP_DAC_OVERRIDE) bypasses file permissions
            pytest.skip("running as root; test_permission_error_is_named_not_reported_as_missing covers this")
        with pytest.raises(CheckpointError, match="permission denied.*chmod") as info:
            load_checkpoint(path)
        assert "not found" not in str(info.value)
    finally:
        path.chmod(0o644)


def test_permission_error_is_named_not_reported_as_missing(
    saved: tuple[Path, CharLSTM, Vocab], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _, _ = saved

    def denied(file: object, *_args: object, **_kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(checkpoint_module, "open", denied, raising=False)
    for load in (load_checkpoint, read_safetensors):
        with pytest.raises(CheckpointError, match="permission denied") as info:
            load(path)
        message = str(info.value)
        assert "not found" not in message and "No such file" not in message
        assert re.search(r"\(mode \d{3}, owner uid \d+\); check the file's mode and owner", message)


def test_directories_and_fifos_are_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    for path in (tmp_path, fifo):
        with pytest.raises(CheckpointError, match="not a regular file"):
            load_checkpoint(path)


def _rewrite(
    path: Path, metadata: dict[str, str] | None = None, tensors: dict[str, torch.Tensor | None] | None = None
) -> Path:
    """Rewrite a real checkpoint with some metadata fields or tensors replaced (None drops a tensor)."""
    with safe_open(str(path), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = dict(f.metadata())
    meta.update(metadata or {})
    for name, tensor in (tensors or {}).items():
        if tensor is None:
            stored.pop(name)
        else:
            stored[name] = tensor
    save_file(stored, str(path), metadata=meta)
    return path


def _model_meta(**changes: object) -> dict[str, str]:
    config: dict[str, object] = {"vocab_size": 7, "embed": 4, "hidden": 8, "layers": 2, "dropout": 0.25}
    config.update(changes)
    return {"charlm.model": json.dumps(config)}


def _refused(path: Path) -> str:
    """The CheckpointError message for `path`, which must be one line."""
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    return message


@pytest.mark.parametrize("sizes", [{"hidden": 12000}, {"hidden": 10**9}, {"layers": 100000}, {"embed": 60000}])
def test_crafted_sizes_are_refused_before_anything_is_allocated(
    saved: tuple[Path, CharLSTM, Vocab], monkeypatch: pytest.MonkeyPatch, sizes: dict[str, int]
) -> None:
    path, _, _ = saved
    _rewrite(path, _model_meta(**sizes))
    assert path.stat().st_size < 32_000

    def no_model(*_args: object) -> None:
        raise AssertionError("a model was built before the sizes were checked against the stored tensors")

    monkeypatch.setattr(checkpoint_module, "CharLSTM", no_model)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    message = _refused(path)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) < 200 * 1024
    name = next(iter(sizes))
    assert name in message or "shape" in message


def test_crafted_hidden_does_not_balloon_memory(saved: tuple[Path, CharLSTM, Vocab]) -> None:
    """Without stubbing the model out: the file is refused before a 12000-wide LSTM (2.4 GB) exists."""
    path, _, _ = saved
    _rewrite(path, _model_meta(hidden=12000))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) < 200 * 1024
    message = str(info.value)
    assert "\n" not in message and "'lstm.weight_ih_l0'" in message and "[48000, 4]" in message and "[32, 4]" in message


@pytest.mark.parametrize(
    ("tensors", "expected"),
    [
        ({"fc.bias": None}, r"'fc\.bias' \(shape \[7\]\) is missing"),
        ({"lstm.weight_ih_l2": torch.zeros(32, 8)}, r"unexpected tensor 'lstm\.weight_ih_l2' \(shape \[32, 8\]\)"),
        ({"fc.weight": torch.zeros(7, 9)}, r"'fc\.weight' has shape \[7, 9\].*implies \[7, 8\]"),
        ({"lstm.bias_hh_l1": torch.zeros(33)}, r"'lstm\.bias_hh_l1' has shape \[33\].*implies \[32\]"),
    ],
)
def test_weights_not_matching_the_config_are_named(
    saved: tuple[Path, CharLSTM, Vocab], tensors: dict[str, torch.Tensor | None], expected: str
) -> None:
    path, _, _ = saved
    assert re.search(expected, _refused(_rewrite(path, tensors=tensors)))


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"charlm.model": DEEP}, "'charlm.model' is nested too deeply"),
        ({"charlm.train": DEEP}, "'charlm.train' is nested too deeply"),
        ({"charlm.vocab": DEEP}, "vocabulary.*nested too deeply"),
        ({"charlm.model": "{not json"}, "'charlm.model' is not JSON"),
        (_model_meta(hidden=32.5), r"hidden must be an integer.*32\.5"),
        (_model_meta(hidden=8.0), r"hidden must be an integer.*8\.0"),
        (_model_meta(layers=True), "layers must be an integer.*True"),
        (_model_meta(embed="4"), "embed must be an integer"),
        (_model_meta(hidden=0), r"hidden must be an integer in \[1, "),
        (_model_meta(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (_model_meta(dropout="0.1"), "dropout must be a number"),
        ({"charlm.model": '{"vocab_size": 7, "embed": 4, "hidden": 8, "layers": 2, "dropout": NaN}'}, "dropout"),
        (_model_meta(width=3), "unknown field 'width'"),
        ({"charlm.model": "[7, 4, 8, 2]"}, "expected a JSON object, got list"),
        ({"charlm.train": "[1, 2]"}, "'charlm.train' must be a JSON object, got list"),
        ({"charlm.train": '"fast"'}, "'charlm.train' must be a JSON object, got str"),
        ({"charlm.vocab": '"abcdefg"'}, "vocabulary.*list of characters"),
        ({"charlm.vocab": json.dumps([" ", "a", "b", "c", "d", "e", "fg"])}, "distinct single characters.*'fg'"),
        ({"charlm.vocab": json.dumps([" ", "a", "b", "c", "d", "e", "e"])}, "distinct single characters.*'e'"),
        ({"charlm.vocab": json.dumps([" ", "a", "b", "c", "d", "e", "\ud800"])}, r"U\+D800"),
        ({"charlm.vocab": json.dumps([" ", "a", "b", "c", "d", "e"])}, "vocab_size 7 != 6"),
    ],
)
def test_broken_metadata_is_refused_in_one_line(
    saved: tuple[Path, CharLSTM, Vocab], metadata: dict[str, str], expected: str
) -> None:
    path, _, _ = saved
    assert re.search(expected, _refused(_rewrite(path, metadata)))


def test_non_float_tensors_are_refused(saved: tuple[Path, CharLSTM, Vocab]) -> None:
    path, _, _ = saved
    message = _refused(_rewrite(path, tensors={"embedding.weight": torch.zeros(7, 4, dtype=torch.int8)}))
    assert "'embedding.weight' has dtype I8, not a floating type" in message


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_load_as_float32(saved: tuple[Path, CharLSTM, Vocab], dtype: torch.dtype) -> None:
    path, model, _ = saved
    with safe_open(str(path), "pt") as f:
        halved = {k: f.get_tensor(k).to(dtype) for k in f.keys()}  # noqa: SIM118
    ckpt = load_checkpoint(_rewrite(path, tensors=dict(halved)))
    for name, tensor in ckpt.model.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, halved[name].float())


@pytest.mark.parametrize(("name", "value"), [("fc.bias", float("nan")), ("lstm.weight_hh_l1", float("inf"))])
def test_non_finite_weights_are_refused(saved: tuple[Path, CharLSTM, Vocab], name: str, value: float) -> None:
    path, model, _ = saved
    tensor = model.state_dict()[name].clone()
    tensor.view(-1)[3] = value
    assert f"tensor '{name}' holds NaN or Inf" in _refused(_rewrite(path, tensors={name: tensor}))


def test_error_messages_are_one_line() -> None:
    assert str(CheckpointError("Error(s) in loading:\n\tsize mismatch for fc.bias\n")) == (
        "Error(s) in loading: size mismatch for fc.bias"
    )
