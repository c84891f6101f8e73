"""Many models in one server (app/registry.py), through `with TestClient(app)`: the registry, `model` on
every route, loading and eviction, admin routes, reload, and bad files. The SIGHUP and hot reload under
load of a real process are in test_reload.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from app.main import create_app
from app.settings import Settings
from charlm.checkpoint import Checkpoint, load_checkpoint
from charlm.engine import Engine
from charlm.request import GenerationRequest
from tests.conftest import make_other
from tests.test_openai import assert_openai_error
from tests.test_service import assert_error

ADMIN = "admin-s3cret"


def settings(directory: Path, **overrides: Any) -> Settings:
    return Settings(models=str(directory), default_model="a", device="cpu", **overrides)


@pytest.fixture
def client(models_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings(models_dir, admin_key=ADMIN))) as c:
        yield c


def alone(path: Path, request: GenerationRequest) -> str:
    """The text `request` gets from the model in `path` in an engine of its own."""
    checkpoint = load_checkpoint(path)
    with Engine(checkpoint.model, checkpoint.vocab) as engine:
        return engine.generate(request, timeout=60).text


def version_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def statuses(client: TestClient) -> dict[str, str]:
    return {m["id"]: m["status"] for m in client.get("/v1/models").json()["data"]}


def generate(client: TestClient, model: str | None, seed: int = 1, **body: Any) -> dict[str, Any]:
    payload = {"seed": "The ", "length": 200, "random_seed": seed, **body}
    if model is not None:
        payload["model"] = model
    r = client.post("/generate", json=payload)
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


def test_two_models_each_give_their_own_text_and_say_which_made_it(client: TestClient, models_dir: Path) -> None:
    request = GenerationRequest("The ", length=200, random_seed=1)
    for model in ("a", "b"):
        path = models_dir / f"{model}.safetensors"
        r = client.post("/generate", json={"seed": "The ", "length": 200, "random_seed": 1, "model": model})
        body = r.json()
        assert body["text"] == alone(path, request)
        assert (body["model"], body["model_version"]) == (model, version_of(path))
        assert r.headers["x-charlm-model-version"] == version_of(path)
    assert generate(client, "a")["text"] != generate(client, "b")["text"]
    assert generate(client, None)["model"] == "a"  # no `model`: the default


def test_every_route_takes_model(client: TestClient, models_dir: Path) -> None:
    b = version_of(models_dir / "b.safetensors")
    scored = client.post("/score", json={"text": "The sea.", "model": "b"}).json()
    assert (scored["model"], scored["model_version"]) == ("b", b)
    assert scored["bits_per_char"] != client.post("/score", json={"text": "The sea."}).json()["bits_per_char"]
    with client.stream("POST", "/generate/stream", json={"seed": "The ", "length": 30, "model": "b"}) as r:
        done = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {\"finish_reason")]
    assert (done[0]["model"], done[0]["model_version"]) == ("b", b)
    completion = client.post("/v1/completions", json={"model": "b", "prompt": "The ", "max_tokens": 20}).json()
    assert completion["model"] == "b" and completion["system_fingerprint"] == f"fp_{b}"


def test_the_listing_says_what_a_client_needs_to_choose(client: TestClient, models_dir: Path) -> None:
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert set(models) == {"a", "b"}
    assert models["a"]["default"] and not models["b"]["default"]
    assert models["a"]["status"] == "loaded" and models["b"]["status"] == "available"  # CHARLM_PRELOAD=default
    assert models["b"]["bits_per_char"] == 9.5 and models["b"]["parameters"] == models["a"]["parameters"] > 0
    assert models["a"]["version"] == version_of(models_dir / "a.safetensors") and models["b"]["version"] is None
    generate(client, "b")
    assert statuses(client) == {"a": "loaded", "b": "loaded"}
    assert client.get("/v1/models/b").json()["version"] == version_of(models_dir / "b.safetensors")
    info = client.get("/info").json()
    assert info["default_model"] == "a" and [m["id"] for m in info["models"]] == ["a", "b"]
    assert info["model"]["id"] == "a" and all("/" not in m["checkpoint"] for m in info["models"])


@pytest.mark.parametrize("model", ["c", "../a", "/etc/passwd", "a/../b", "a.safetensors", "..", "", "a\x00"])
def test_only_the_registrys_models_can_be_named(client: TestClient, model: str) -> None:
    error = assert_error(client.post("/generate", json={"seed": "The", "model": model}), 404, "not_found")
    assert "'a', 'b'" in error["message"]  # the ids there are
    message = assert_openai_error(client.post("/v1/completions", json={"model": model or "x", "prompt": "The"}),
                                  404, "model", "model_not_found")
    assert "'a', 'b'" in message
    assert_error(client.post("/score", json={"text": "The", "model": model}), 404, "not_found")


def test_a_symlink_leaving_the_directory_is_not_a_model(tmp_path: Path, models_dir: Path,
                                                        tiny_checkpoint_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(tiny_checkpoint_path, outside / "secret.safetensors")
    (models_dir / "escape.safetensors").symlink_to(outside / "secret.safetensors")
    (models_dir / "inside.safetensors").symlink_to(models_dir / "b.safetensors")  # inside: fine
    with TestClient(create_app(settings(models_dir))) as c:
        assert set(statuses(c)) == {"a", "b", "inside"}
        assert_error(c.post("/generate", json={"seed": "The", "model": "escape"}), 404, "not_found")


def test_a_model_copied_in_appears_without_a_restart(client: TestClient, models_dir: Path) -> None:
    assert_error(client.post("/generate", json={"seed": "The", "model": "c"}), 404, "not_found")
    shutil.copy(models_dir / "b.safetensors", models_dir / ".c.tmp")
    os.replace(models_dir / ".c.tmp", models_dir / "c.safetensors")
    assert "c" in statuses(client)
    assert generate(client, "c")["text"] == generate(client, "b")["text"]


def test_a_damaged_model_fails_only_its_own_requests(client: TestClient, models_dir: Path) -> None:
    (models_dir / "broken.safetensors").write_bytes(b"\x00" * 100)
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert listed["broken"]["status"] == "unavailable" and "not a readable safetensors" in listed["broken"]["error"]
    assert str(models_dir) not in listed["broken"]["error"]  # the file's name, not where it lies
    error = assert_error(client.post("/generate", json={"seed": "The", "model": "broken"}), 503, "not_ready")
    assert "broken.safetensors is not a readable safetensors file" in error["message"]
    assert str(models_dir) not in error["message"]
    message = assert_openai_error(client.post("/v1/completions", json={"model": "broken", "prompt": "The"}), 503,
                                  "model", "model_unavailable")
    assert "broken" in message
    assert generate(client, "a")["model"] == "a" and generate(client, "b")["model"] == "b"
    shutil.copy(models_dir / "b.safetensors", models_dir / "broken.safetensors")  # fixed: tried again
    assert generate(client, "broken")["text"] == generate(client, "b")["text"]


def test_a_crafted_checkpoint_asking_for_huge_tensors_is_refused(client: TestClient, models_dir: Path,
                                                                  tiny: Checkpoint) -> None:
    """The header claims a 65536-wide LSTM (tens of GB) over tiny tensors: refused from the header alone."""
    metadata = {"charlm.format": "1", "charlm.vocab": tiny.vocab.to_json(), "charlm.train": "{}",
                "charlm.model": json.dumps({**tiny.config.to_dict(), "hidden": 65536})}
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()},
              str(models_dir / "huge.safetensors"), metadata=metadata)
    error = assert_error(client.post("/generate", json={"seed": "The", "model": "huge"}), 503, "not_ready")
    assert "has shape" in error["message"]
    assert generate(client, "b")["model"] == "b"


def test_a_model_file_over_the_size_limit_is_not_read(models_dir: Path) -> None:
    with TestClient(create_app(settings(models_dir, max_model_mb=1))) as c:
        (models_dir / "big.safetensors").write_bytes(b"\x00" * (2 * 2**20))
        error = assert_error(c.post("/generate", json={"seed": "The", "model": "big"}), 503, "not_ready")
        assert "CHARLM_MAX_MODEL_MB" in error["message"]


def test_a_model_deleted_while_loaded_keeps_serving_until_unloaded(client: TestClient, models_dir: Path) -> None:
    text = generate(client, "b")["text"]
    (models_dir / "b.safetensors").unlink()
    assert statuses(client)["b"] == "loaded" and generate(client, "b")["text"] == text
    headers = {"Authorization": f"Bearer {ADMIN}"}
    assert client.post("/admin/models/b/unload", headers=headers).json()["was_loaded"] is True
    assert "b" not in statuses(client)
    assert_error(client.post("/generate", json={"seed": "The", "model": "b"}), 404, "not_found")


def test_one_model_at_a_time_alternating_gives_every_text_right(models_dir: Path) -> None:
    expected = {m: alone(models_dir / f"{m}.safetensors", GenerationRequest("The ", length=200, random_seed=1))
                for m in ("a", "b")}
    with TestClient(create_app(settings(models_dir, max_loaded=1))) as c:
        for model in ["a", "b"] * 4:
            assert generate(c, model)["text"] == expected[model]
            assert list(statuses(c).values()).count("loaded") == 1 and statuses(c)[model] == "loaded"
        loads = c.get("/metrics").text
    assert 'charlm_model_loads_total{model="b",outcome="ok"} 4.0' in loads


def test_keep_alive_unloads_an_idle_model_but_not_the_default(models_dir: Path) -> None:
    with TestClient(create_app(settings(models_dir, keep_alive=0.2))) as c:
        generate(c, "b")
        deadline = time.monotonic() + 60  # the sweep runs every keep_alive / 4: long before this
        while statuses(c)["b"] == "loaded" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert statuses(c) == {"a": "loaded", "b": "available"}


def test_preload_all_and_none(models_dir: Path) -> None:
    with TestClient(create_app(settings(models_dir, preload="all"))) as c:
        assert statuses(c) == {"a": "loaded", "b": "loaded"}
    with TestClient(create_app(settings(models_dir, preload="none"))) as c:
        assert statuses(c) == {"a": "available", "b": "available"}
        assert generate(c, None)["model"] == "a"  # loaded by its first request, which waits for it


def test_concurrent_first_requests_share_one_load(models_dir: Path) -> None:
    import concurrent.futures

    with TestClient(create_app(settings(models_dir))) as c:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(lambda s: generate(c, "b", seed=s)["text"], range(8)))
        assert len(set(texts)) == 8
        assert 'charlm_model_loads_total{model="b",outcome="ok"} 1.0' in c.get("/metrics").text


def test_metrics_carry_the_model(client: TestClient) -> None:
    generate(client, "a")
    generate(client, "b")
    text = client.get("/metrics").text
    for model in ("a", "b"):
        assert f'charlm_generated_characters_total{{model="{model}"}} 200.0' in text
        assert f'charlm_decode_steps_total{{model="{model}"}}' in text
    assert 'charlm_generations_total{finish_reason="length",model="b"} 1.0' in text
    assert 'charlm_model_loaded{model="b",version="' in text


def test_admin_routes_need_their_own_key(models_dir: Path) -> None:
    with TestClient(create_app(settings(models_dir))) as c:  # no admin key: no admin routes
        assert c.post("/admin/models/b/load").status_code == 404
    with TestClient(create_app(settings(models_dir, admin_key=ADMIN, api_key="api-key"))) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer api-key"}):
            error = assert_error(c.post("/admin/models/b/load", headers=headers), 401, "unauthorized")
            assert "admin key" in error["message"]
        assert statuses_with(c, "api-key")["b"] == "available"
        admin = {"Authorization": f"Bearer {ADMIN}"}
        loaded = c.post("/admin/models/b/load", headers=admin).json()
        assert loaded == {"id": "b", "status": "loaded", "version": version_of(models_dir / "b.safetensors")}
        assert statuses_with(c, "api-key")["b"] == "loaded"
        assert c.post("/admin/models/b/unload", headers=admin).json()["was_loaded"] is True
        assert statuses_with(c, "api-key")["b"] == "available"
        assert_error(c.post("/admin/models/zz/load", headers=admin), 404, "not_found")


def statuses_with(client: TestClient, key: str) -> dict[str, str]:
    data = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).json()["data"]
    return {m["id"]: m["status"] for m in data}


def test_the_admin_key_must_differ_from_the_api_key(models_dir: Path) -> None:
    with pytest.raises(ValueError, match="must differ"):
        settings(models_dir, admin_key="same", api_key="same")


def test_reload_swaps_the_weights_and_refuses_a_damaged_file(client: TestClient, models_dir: Path,
                                                             tiny: Checkpoint) -> None:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    old = version_of(models_dir / "a.safetensors")
    unchanged = client.post("/admin/models/a/reload", headers=admin).json()
    assert unchanged["changed"] is False and unchanged["version"] == old
    new_path = make_other(tiny, models_dir / ".a.tmp", scale=1.1)
    new = version_of(new_path)
    os.replace(new_path, models_dir / "a.safetensors")  # replaced atomically, as the README says
    swapped = client.post("/admin/models/a/reload", headers=admin).json()
    assert (swapped["previous_version"], swapped["version"], swapped["changed"]) == (old, new, True)
    request = GenerationRequest("The ", length=200, random_seed=1)
    assert generate(client, "a")["text"] == alone(models_dir / "a.safetensors", request)
    (models_dir / ".a.tmp").write_bytes(b"damaged")
    os.replace(models_dir / ".a.tmp", models_dir / "a.safetensors")
    error = assert_error(client.post("/admin/models/a/reload", headers=admin), 422, "validation_error")
    assert "not a readable safetensors" in error["message"]
    kept = generate(client, "a")
    assert kept["model_version"] == new  # the old version keeps serving
    listed = client.get("/v1/models/a").json()
    assert listed["status"] == "loaded" and f"version {new} keeps serving" in listed["error"]
