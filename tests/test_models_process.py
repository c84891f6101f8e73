"""Many models in a real server process: the `openai` SDK over two models, hot reload by SIGHUP with 64
requests in flight (nothing lost, each text what its version gives alone), and SIGHUP during a load."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from charlm.checkpoint import Checkpoint, load_checkpoint
from charlm.engine import Engine
from charlm.request import EngineLimits, GenerationRequest
from tests.conftest import make_other
from tests.server import Server, running_server
from tests.test_models import version_of


def serve(directory: Path, **env: str) -> Any:
    """A server for every model in `directory`, `a` the default."""
    return running_server(directory / "a.safetensors", CHARLM_MODELS=str(directory), **env)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)


def batch_alone(path: Path, requests: list[GenerationRequest]) -> list[str]:
    """Each request's text from the model in `path`, in an engine of its own."""
    checkpoint = load_checkpoint(path)
    with Engine(checkpoint.model, checkpoint.vocab, EngineLimits(max_batch=64, max_length=20_000)) as engine:
        return [g.result(timeout=600).text for g in engine.submit_many(requests)]


def test_the_openai_sdk_lists_and_uses_two_models(models_dir: Path) -> None:
    import openai

    with serve(models_dir) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        listed = {m.id: m for m in client.models.list().data}
        assert set(listed) == {"a", "b"} and listed["a"].model_extra["default"] is True  # type: ignore[index]
        for model in ("a", "b"):
            completion = client.completions.create(model=model, prompt="The ", max_tokens=50, seed=3)
            assert completion.model == model
            assert completion.system_fingerprint == f"fp_{version_of(models_dir / f'{model}.safetensors')}"
            alone = batch_alone(models_dir / f"{model}.safetensors",
                                [GenerationRequest("The ", length=50, random_seed=3)])[0]
            assert "The " + completion.choices[0].text == alone
        with pytest.raises(openai.NotFoundError) as missing:
            client.completions.create(model="nope", prompt="The ", max_tokens=5)
        assert "'a', 'b'" in missing.value.message


def test_hot_reload_under_load_loses_nothing(models_dir: Path, tiny: Checkpoint, tmp_path: Path) -> None:
    """SIGHUP after the file is replaced: the 64 requests in flight finish on the old weights, each with
    the text that version gives alone; requests after the reload get the new version."""
    old_copy = tmp_path / "old.safetensors"
    shutil.copy(models_dir / "a.safetensors", old_copy)
    old = version_of(old_copy)
    requests = [GenerationRequest("The ", length=8_000, random_seed=s) for s in range(64)]
    responses: list[httpx.Response | None] = [None] * 64
    with serve(models_dir, CHARLM_MAX_LENGTH="20000", CHARLM_MAX_BATCH="64") as server:

        def send(i: int) -> None:
            body = {"seed": "The ", "length": 8_000, "random_seed": i, "model": "a"}
            responses[i] = httpx.post(f"{server.url}/generate", json=body, timeout=600)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        wait_for(lambda: server.metric('charlm_active_rows{model="a"}') == 64, "64 rows decoding")
        new_file = make_other(tiny, models_dir / ".a.tmp", scale=1.1)
        new = version_of(new_file)
        os.replace(new_file, models_dir / "a.safetensors")
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: version_served(server, "a") == new, "the new version serving")
        in_flight = sum(r is None for r in responses)
        for t in threads:
            t.join(timeout=600)
        after = httpx.post(f"{server.url}/generate", json={"seed": "The ", "length": 100, "random_seed": 1,
                                                            "model": "a"}, timeout=60).json()
        assert "reloaded model a" in server.output()
    assert in_flight > 0, "the requests had all finished before the reload: nothing was tested"
    assert all(r is not None and r.status_code == 200 for r in responses), [r and r.text for r in responses]
    assert {r.json()["model_version"] for r in responses if r} == {old}
    assert [r.json()["text"] for r in responses if r] == batch_alone(old_copy, requests)
    assert after["model_version"] == new
    assert after["text"] == batch_alone(models_dir / "a.safetensors",
                                        [GenerationRequest("The ", length=100, random_seed=1)])[0]


def version_served(server: Server, model: str) -> str | None:
    version: str | None = httpx.get(f"{server.url}/v1/models/{model}", timeout=10).json()["version"]
    return version


def test_sighup_during_a_load_fails_nothing(models_dir: Path) -> None:
    with serve(models_dir, CHARLM_PRELOAD="none") as server:
        results: list[httpx.Response] = []
        loading = threading.Thread(target=lambda: results.append(httpx.post(
            f"{server.url}/generate", json={"seed": "The ", "length": 20, "model": "b"}, timeout=60)))
        loading.start()
        for _ in range(3):
            server.process.send_signal(signal.SIGHUP)
        loading.join(timeout=60)
        assert results[0].status_code == 200 and results[0].json()["model"] == "b"
        assert httpx.get(f"{server.url}/ready", timeout=10).status_code == 200
        assert server.process.poll() is None
