import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from charlm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
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
