"""The service through `with TestClient(create_app(settings))`: lifespan and all."""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.main import create_app
from app.routes import generate as generate_routes
from app.settings import Settings
from charlm import native
from charlm.engine import EngineHooks
from charlm.handles import Generation
from charlm.request import GenerationRequest
from tests.conftest import default_engine
from tests.test_engine import ENDLESS, hold_the_row


def settings_for(path: Path, **overrides: object) -> Settings:
    return Settings(checkpoint=path, device="cpu", **overrides)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def client(tiny_checkpoint_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tiny_checkpoint_path, max_length=800))) as c:
        yield c


def assert_error(response, status: int, kind: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["type"] == kind and body["error"]["message"]
    return body["error"]


def test_generate(client: TestClient) -> None:
    r = client.post("/generate", json={"seed": "The ", "length": 100, "scale_factor": 2.0, "random_seed": 7})
    assert r.status_code == 200
    body = r.json()
    assert body["text"] == "The " + body["generated"] and len(body["generated"]) == 100
    assert body["finish_reason"] == "length" and body["random_seed"] == 7
    assert body["usage"] == {"seed_chars": 4, "generated_chars": 100}
    assert body["timings"]["chars_per_s"] > 0


def test_reproducible_through_http(client: TestClient) -> None:
    request = {"seed": "The ", "length": 150, "random_seed": 42, "top_k": 10}
    first, second = (client.post("/generate", json=request).json()["text"] for _ in range(2))
    assert first == second
    drawn = client.post("/generate", json={"seed": "The ", "length": 150}).json()
    again = client.post("/generate", json={"seed": "The ", "length": 150, "random_seed": drawn["random_seed"]})
    assert again.json()["text"] == drawn["text"]


def test_stop_string(client: TestClient) -> None:
    base = client.post("/generate", json={"seed": "The ", "length": 200, "random_seed": 3}).json()["generated"]
    stop = base[30:33]
    r = client.post("/generate", json={"seed": "The ", "length": 200, "random_seed": 3, "stop": [stop]}).json()
    assert r["finish_reason"] == "stop" and r["generated"] == base[: base.index(stop)]


def parse_sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "event" in fields:
            events.append((fields["event"], json.loads(fields["data"])))
    return events


def test_stream_event_order_and_content(client: TestClient) -> None:
    request = {"seed": "The ", "length": 60, "random_seed": 11}
    with client.stream("POST", "/generate/stream", json=request) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(r.read().decode())
    kinds = [k for k, _ in events]
    assert kinds == ["text"] * (len(kinds) - 1) + ["done"] and len(kinds) >= 2
    streamed = "".join(d["text"] for k, d in events if k == "text")
    assert streamed == client.post("/generate", json=request).json()["generated"]
    done = events[-1][1]
    assert done["finish_reason"] == "length" and done["usage"]["generated_chars"] == 60 and "timings" in done


def test_stream_sends_at_most_one_text_event_per_interval(tiny_checkpoint_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    request = {"seed": "The ", "length": 800, "random_seed": 11}
    pauses: list[float] = []
    real_sleep = asyncio.sleep

    def text_events(interval_ms: int) -> tuple[list[str], str]:
        app = create_app(settings_for(tiny_checkpoint_path, stream_interval_ms=interval_ms))
        with TestClient(app) as c:
            engine = default_engine(app)
            before = engine.stats.completed  # the warm-up generation

            async def pause_until_done(seconds: float) -> None:
                """The handler's pause, lasting until the generation has ended, however fast the machine."""
                pauses.append(seconds)
                while engine.stats.completed == before:
                    await real_sleep(0.001)

            monkeypatch.setattr(generate_routes, "sleep", pause_until_done)
            with c.stream("POST", "/generate/stream", json=request) as r:
                events = parse_sse(r.read().decode())
            return [d["text"] for k, d in events if k == "text"], c.post("/generate", json=request).json()["generated"]

    each, generated = text_events(0)  # an event whenever the handler finds new text, no pause
    assert pauses == [] and "".join(each) == generated
    paced, generated = text_events(1000)  # what was there at once, then everything sampled during the pause
    assert 1 <= len(paced) <= 2 and "".join(paced) == generated
    assert pauses == [1.0] * len(paced)  # one interval after each event


def test_stream_refusals_are_json_errors(client: TestClient) -> None:
    r = client.post("/generate/stream", json={"seed": "The €", "length": 5})
    err = assert_error(r, 422, "validation_error")
    assert err["details"][0]["unknown_characters"] == ["€"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"seed": "The", "length": 0}, "length"),
        ({"seed": "The", "length": 801}, "length"),
        ({"seed": "", "length": 5}, "seed"),
        ({"seed": "The", "scale_factor": 0}, "scale_factor"),
        ({"seed": "The", "scale_factor": -1.5}, "scale_factor"),
        ({"seed": "The", "top_k": 0}, "top_k"),
        ({"seed": "The", "top_p": 1.5}, "top_p"),
        ({"seed": "The", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"seed": "The", "random_seed": -3}, "random_seed"),
        ({"seed": "The", "random_seed": False}, "random_seed"),  # not read as 0
        ({"seed": "The", "random_seed": 1.0}, "random_seed"),
        ({"seed": "The", "length": True}, "length"),
        ({"seed": "The", "top_k": 2**63}, "top_k"),  # overflowed a batch's tensors on the PyTorch path
        ({"seed": "The", "top_k": 2**31}, "top_k"),  # was truncated to 32 bits by the native sampler
        ({"seed": "The", "scale_factor": 3.5e38}, "scale_factor"),  # overflowed float32 logits
        ({"seed": "The", "stop": [""]}, "stop.0"),
        ({"seed": "The", "unknown": 1}, "unknown"),
        ({"length": 5}, "seed"),
    ],
)
def test_validation_names_the_field(client: TestClient, body: dict, field: str) -> None:
    err = assert_error(client.post("/generate", json=body), 422, "validation_error")
    assert field in [d["field"] for d in err["details"]], err


def test_ranges_are_documented_on_the_api_page(client: TestClient) -> None:
    from charlm.sampling import MAX_SCALE_FACTOR, MAX_TOP_K

    props = client.get("/openapi.json").json()["components"]["schemas"]["GenerateRequest"]["properties"]
    assert props["scale_factor"]["maximum"] == MAX_SCALE_FACTOR
    assert props["top_k"]["anyOf"][0]["maximum"] == MAX_TOP_K
    assert props["random_seed"]["anyOf"][0]["maximum"] == 2**53 - 1


def test_unknown_characters_are_named_but_capped(client: TestClient) -> None:
    many = "".join(chr(0x4E00 + i) for i in range(5000))
    r = client.post("/generate", json={"seed": many, "length": 5})
    detail = assert_error(r, 422, "validation_error")["details"][0]
    assert len(detail["unknown_characters"]) == 20 and detail["unknown_count"] == 5000
    assert len(r.content) < 2000


def test_limit_is_named(client: TestClient) -> None:
    err = assert_error(client.post("/generate", json={"seed": "The", "length": 5000}), 422, "validation_error")
    assert "800" in err["details"][0]["message"]


def test_large_invalid_input_is_not_echoed(client: TestClient) -> None:
    huge = "€" * 12_000
    r = client.post("/generate", json={"seed": huge, "length": 5})
    assert_error(r, 422, "validation_error")
    assert len(r.content) < 2000 and huge[:100] not in r.text
    r = client.post("/generate", json={"seed": "The", "length": "x" * 20_000})
    assert_error(r, 422, "validation_error")
    assert len(r.content) < 2000


def test_oversized_body_is_413(client: TestClient) -> None:
    r = client.post("/generate", content=b'{"seed": "' + b"a" * 70_000 + b'"}',
                    headers={"content-type": "application/json"})
    assert_error(r, 413, "payload_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        yield b'{"seed": "'
        for _ in range(100):
            yield b"a" * 1000
        yield b'"}'

    r = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, "payload_too_large")


def test_malformed_json_is_422(client: TestClient) -> None:
    r = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 422, "validation_error")


def test_unknown_route_and_method_use_the_error_shape(client: TestClient) -> None:
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/generate"), 405, "method_not_allowed")


def test_health_ready_info(client: TestClient, tiny_checkpoint_path: Path) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready"}
    info = client.get("/info").json()
    assert info["model"]["config"]["hidden"] == 48 and info["model"]["parameters"] > 0
    assert info["training"]["val_bpc"] > 0 and info["limits"]["max_length"] == 800
    assert info["device"] == "cpu" and info["version"] and info["auth_required"] is False
    assert info["limits"]["max_top_k"] > 0 and info["limits"]["max_scale_factor"] > 0
    # Where a C compiler built the kernels, the service must use them; elsewhere PyTorch serves.
    assert info["native_kernels"] is (native.load() is not None)
    if shutil.which("cc") or shutil.which("gcc"):
        assert info["native_kernels"] is True


def test_startup_objects_are_frozen_out_of_the_collector(tiny_checkpoint_path: Path) -> None:
    gc.unfreeze()
    try:
        with TestClient(create_app(settings_for(tiny_checkpoint_path))) as c:
            assert c.get("/ready").status_code == 200
            assert gc.get_freeze_count() > 10_000  # torch, FastAPI and the model, not a handful
    finally:
        gc.unfreeze()


def test_metrics(client: TestClient) -> None:
    client.post("/generate", json={"seed": "The ", "length": 10})
    client.post("/generate", json={"seed": "The ", "length": 0})
    text = client.get("/metrics").text
    assert 'charlm_http_requests_total{route="/generate",status="200"}' in text
    assert 'charlm_http_requests_total{route="/generate",status="422"}' in text
    assert "charlm_http_request_duration_seconds_bucket" in text
    assert "charlm_generated_characters_total" in text and "charlm_queue_depth" in text
    assert "charlm_decode_rows_total" in text


def test_docs_are_served_from_local_files(client: TestClient) -> None:
    page = client.get("/docs").text
    assert "/static/swagger-ui-bundle.js" in page and "cdn" not in page.lower()
    assert client.get("/static/swagger-ui-bundle.js").status_code == 200
    schema = client.get("/openapi.json").json()["components"]["schemas"]["GenerateRequest"]
    assert schema["examples"][0]["seed"] == "The island"


def test_api_key(tiny_checkpoint_path: Path) -> None:
    with TestClient(create_app(settings_for(tiny_checkpoint_path, api_key="s3cret"))) as c:
        assert_error(c.post("/generate", json={"seed": "The", "length": 5}), 401, "unauthorized")
        wrong = {"Authorization": "Bearer nope"}
        assert_error(c.post("/generate", json={"seed": "The", "length": 5}, headers=wrong), 401, "unauthorized")
        assert_error(c.get("/info"), 401, "unauthorized")
        ok = {"Authorization": "Bearer s3cret"}
        assert c.post("/generate", json={"seed": "The", "length": 5}, headers=ok).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200


def test_queue_full_is_429_with_retry_after(tiny_checkpoint_path: Path) -> None:
    app = create_app(settings_for(tiny_checkpoint_path, max_batch=1, max_queue=1, max_length=ENDLESS))
    with TestClient(app) as c:
        engine = default_engine(app)
        running = hold_the_row(engine)
        waiting = engine.submit(GenerationRequest("The ", length=5))
        r = c.post("/generate", json={"seed": "The", "length": 5})
        assert_error(r, 429, "queue_full")
        assert r.headers["retry-after"] == "1"
        waiting.cancel()  # a cancelled request gives its queue place back at once
        assert engine.queue_depth == 0
        running.cancel()


def test_empty_api_key_is_refused_at_start(tiny_checkpoint_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHARLM_API_KEY", "")
    with pytest.raises(ValidationError, match="CHARLM_API_KEY is set but empty"):
        Settings(checkpoint=tiny_checkpoint_path)
    monkeypatch.setenv("CHARLM_API_KEY", "  ")
    with pytest.raises(ValidationError, match="empty"):
        Settings(checkpoint=tiny_checkpoint_path)


def test_credentials_are_checked_before_the_body(tiny_checkpoint_path: Path) -> None:
    with TestClient(create_app(settings_for(tiny_checkpoint_path, api_key="s3cret"))) as c:
        headers = {"content-type": "application/json"}
        assert_error(c.post("/generate", content=b"{not json", headers=headers), 401, "unauthorized")
        assert_error(c.post("/generate", json={"seed": 5}), 401, "unauthorized")
        ok = {**headers, "Authorization": "Bearer s3cret"}
        assert_error(c.post("/generate", content=b"{not json", headers=ok), 422, "validation_error")
        assert c.get("/info", headers=ok).json()["auth_required"] is True


def test_openapi_asks_for_a_token_only_when_a_key_is_set(tiny_checkpoint_path: Path) -> None:
    def security(**overrides: object) -> tuple[object, object]:
        with TestClient(create_app(settings_for(tiny_checkpoint_path, **overrides))) as c:
            doc = c.get("/openapi.json").json()
        return doc["paths"]["/generate"]["post"].get("security"), doc["components"].get("securitySchemes")

    assert security() == (None, None)
    required, schemes = security(api_key="s3cret")
    assert required and schemes


def test_not_ready_is_503(tiny_checkpoint_path: Path) -> None:
    app = create_app(settings_for(tiny_checkpoint_path))
    with TestClient(app) as c:
        app.state.draining = True
        assert_error(c.get("/ready"), 503, "not_ready")
        assert_error(c.post("/generate", json={"seed": "The", "length": 5}), 503, "not_ready")
        assert c.get("/health").status_code == 200


def test_settings_refuse_a_batch_beyond_what_the_decoder_is_checked_for(
    tiny_checkpoint_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHARLM_MAX_BATCH", "1025")
    with pytest.raises(ValidationError, match="max_batch"):
        Settings(checkpoint=tiny_checkpoint_path)
    monkeypatch.setenv("CHARLM_MAX_BATCH", "1024")
    assert Settings(checkpoint=tiny_checkpoint_path).max_batch == 1024


def test_missing_default_model_stops_startup(tmp_path: Path) -> None:
    """A server whose default model does not load would serve nothing by default: it does not start."""
    from app.registry import ModelUnavailable

    with pytest.raises(ModelUnavailable, match="not found"), TestClient(create_app(settings_for(tmp_path / "x"))):
        pass


def explode_seed_99(gen: Generation, position: int) -> None:
    """An engine hook: a bug that hits one request mid-stream (random_seed 99, after 20 characters)."""
    if gen.random_seed == 99 and position == 20:
        raise RuntimeError("row exploded")


def test_stream_reports_a_mid_stream_failure_as_an_error_event(tiny_checkpoint_path: Path) -> None:
    app = create_app(settings_for(tiny_checkpoint_path, max_length=800),
                     engine_hooks=EngineHooks(on_char=explode_seed_99))
    with TestClient(app) as client:
        with client.stream("POST", "/generate/stream", json={"seed": "The ", "length": 100, "random_seed": 99}) as r:
            events = parse_sse(r.read().decode())
        assert [k for k, _ in events][-1] == "error" and events[0][0] == "text"
        assert "row exploded" in events[-1][1]["error"]["message"]
        assert client.post("/generate", json={"seed": "The ", "length": 10}).status_code == 200
