import asyncio
import concurrent.futures
import threading
import time

import pytest
import torch

from charlm import native
from charlm.checkpoint import Checkpoint
from charlm.decoder import Decoder
from charlm.engine import (
    Engine,
    EngineClosedError,
    EngineLimits,
    GenerationFailed,
    GenerationRequest,
    QueueFullError,
    RequestError,
)
from charlm.model import CharLSTM, ModelConfig


@pytest.fixture()
def engine(tiny: Checkpoint):
    with Engine(tiny.model, tiny.vocab, EngineLimits(max_batch=64, max_queue=256)) as eng:
        yield eng


def solo(tiny: Checkpoint, request: GenerationRequest, use_native: bool = True) -> str:
    with Engine(tiny.model, tiny.vocab, EngineLimits(max_batch=1), use_native=use_native) as eng:
        return eng.generate(request).text


KERNELS = native.load()


@pytest.mark.parametrize("kernels", [KERNELS, None], ids=["native", "torch"])
def test_decode_step_matches_plain_nn_lstm(tiny: Checkpoint, kernels: native.Kernels | None) -> None:
    model, vocab = tiny.model, tiny.vocab
    ids = vocab.encode("The engineer and the sailor walked along the shore")
    with torch.inference_mode():
        expected, _, _ = model(ids[None])
        decoder = Decoder(model, 4, kernels)
        assert decoder.kernels is kernels
        zeros = torch.zeros(model.config.layers, model.config.hidden)
        decoder.load_row(0, zeros, zeros)
        for t in range(len(ids)):
            decoder.tokens[0] = ids[t]
            logits = decoder.step(1)
            assert torch.allclose(logits[0], expected[0, t], atol=1e-5), t


@pytest.mark.parametrize("kernels", [KERNELS, None], ids=["native", "torch"])
def test_prefill_matches_nn_lstm_and_does_not_depend_on_the_other_seeds(
    tiny: Checkpoint, kernels: native.Kernels | None
) -> None:
    model, vocab = tiny.model, tiny.vocab
    seeds = ["the island while the reporter wrote in his notebook", "The engineer and the sailor", "wood", "T"]
    ids = [vocab.encode(s) for s in seeds]
    with torch.inference_mode():
        decoder = Decoder(model, 8, kernels)
        together = decoder.prefill(0, ids).clone()
        h_together = decoder.h[:, :4].clone()
        for i, seq in enumerate(ids):
            expected, (h, _), _ = model(seq[None])
            assert torch.allclose(together[i], expected[0, -1], atol=1e-5), seeds[i]
            assert torch.allclose(h_together[:, i], h[:, 0], atol=1e-5), seeds[i]
            alone = decoder.prefill(5, [seq])
            assert torch.equal(alone[0], together[i]), seeds[i]


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("size", ["tiny", "default"])
@pytest.mark.parametrize("path", ["native", "onednn", "fixed"])
def test_each_row_of_the_decode_step_is_independent_of_the_batch(
    tiny: Checkpoint, threads: int, size: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # native: the C kernels; onednn: oneDNN and PyTorch ops; fixed: the path CUDA takes, every step
    # at the full row count.
    if path == "fixed":
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    torch.manual_seed(0)
    model = tiny.model if size == "tiny" else CharLSTM(ModelConfig(vocab_size=79)).eval()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    decoder = Decoder(model, 64, KERNELS if path == "native" else None)
    assert (decoder.kernels is not None) == (path == "native")
    decoder.h.normal_()
    decoder.c.normal_()
    decoder.tokens.random_(0, model.config.vocab_size)
    h, c, tokens = decoder.h.clone(), decoder.c.clone(), decoder.tokens.clone()
    with torch.inference_mode():
        full = decoder.step(64).clone()
        try:
            for n in range(1, 64):
                decoder.h.copy_(h)
                decoder.c.copy_(c)
                decoder.tokens.copy_(tokens)
                assert torch.equal(decoder.step(n), full[:n]), n
        finally:
            torch.set_num_threads(before)


def test_same_seed_same_text_and_different_seeds_differ(engine: Engine) -> None:
    def run(seed: int) -> str:
        return engine.generate(GenerationRequest("The ", length=200, random_seed=seed)).generated

    assert run(1) == run(1)
    assert run(1) != run(2)


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "torch"])
def test_reproducible_among_63_concurrent_requests(tiny: Checkpoint, use_native: bool) -> None:
    # Seeds short and long (both prefill paths), repeated (shared prefill rows) and unique.
    requests = [
        GenerationRequest(
            ["The ", "The engineer", "wood", "T", "The sailor and the engineer walked along the shore " * 3][i % 5],
            length=300 + 7 * i,
            scale_factor=0.5 + (i % 5) * 0.4,
            top_k=[None, 5, 20][i % 3],
            top_p=[None, 0.9][i % 2],
            random_seed=1000 + i,
        )
        for i in range(64)
    ]
    with Engine(tiny.model, tiny.vocab, EngineLimits(max_batch=64), use_native=use_native) as engine:
        assert engine.native == use_native
        gens = [engine.submit(r) for r in requests]
        together = [g.result(timeout=120).text for g in gens]
        assert engine.stats["batch_rows"] / engine.stats["steps"] > 30  # they really were batched
    checked = 64 if use_native else 16  # the PyTorch-only path is slower; a quarter of them tells as much
    for req, text in list(zip(requests, together))[:checked]:
        assert text == solo(tiny, req, use_native)


def test_without_onednn_steps_run_at_full_size_and_stay_reproducible(
    tiny: Checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The path CUDA takes: no row-invariant kernel, so every step has the same shape instead.
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    with Engine(tiny.model, tiny.vocab, EngineLimits(max_batch=16), use_native=False) as eng:
        assert not eng._decoder.row_invariant
        requests = [GenerationRequest(["The ", "wood"][i % 2], length=150, random_seed=i) for i in range(16)]
        alone = [eng.generate(r).text for r in requests[:3]]
        together = [g.result(timeout=60).text for g in [eng.submit(r) for r in requests]]
        assert together[:3] == alone
        with torch.inference_mode():
            ids = tiny.vocab.encode("The engineer and the sailor")
            expected, _, _ = tiny.model(ids[None])
            zeros = torch.zeros(tiny.model.config.layers, tiny.model.config.hidden)
            decoder = Decoder(tiny.model, 4)
            decoder.load_row(0, zeros, zeros)
            for t, token in enumerate(ids):
                decoder.tokens[0] = token
                assert torch.allclose(decoder.step(1)[0], expected[0, t], atol=1e-5), t


def test_random_seed_is_drawn_and_reported_when_absent(engine: Engine) -> None:
    first = engine.generate(GenerationRequest("The ", length=50))
    again = engine.generate(GenerationRequest("The ", length=50, random_seed=first.random_seed))
    assert again.text == first.text


def test_stop_string_ends_at_first_match(engine: Engine) -> None:
    base = engine.generate(GenerationRequest("The ", length=300, random_seed=5)).generated
    stop = base[40:43]
    first = base.index(stop)
    gen = engine.submit(GenerationRequest("The ", length=300, random_seed=5, stop=(stop, "@@@@")))
    streamed = "".join(gen)
    result = gen.result()
    assert result.finish_reason == "stop"
    assert result.generated == base[:first] == streamed
    assert result.usage["generated_chars"] == first


def test_streaming_yields_the_generated_text(engine: Engine) -> None:
    gen = engine.submit(GenerationRequest("The ", length=120, random_seed=3))
    chunks = list(gen)
    assert len(chunks) > 10 and "".join(chunks) == gen.result().generated
    timings = gen.result().timings
    assert set(timings) == {"queue_ms", "prefill_ms", "generate_ms", "chars_per_s"}


def test_async_consumers_streamed_per_chunk_awaited_once(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    async def consume() -> tuple[list[str], str, int, int]:
        loop = asyncio.get_running_loop()
        wakeups = 0
        schedule = loop.call_soon_threadsafe

        def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
            nonlocal wakeups
            wakeups += 1
            return schedule(*args, **kwargs)

        monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
        streamed = engine.submit(GenerationRequest("The ", length=200, random_seed=4))
        chunks = [chunk async for chunk in streamed]
        streamed_wakeups, wakeups = wakeups, 0
        awaited = await engine.submit(GenerationRequest("The ", length=200, random_seed=4)).wait()
        awaited_wakeups = wakeups
        late = engine.submit(GenerationRequest("The ", length=200, random_seed=4))
        while not late.done():
            await asyncio.sleep(0.01)
        late_chunks = [chunk async for chunk in late]
        return chunks, awaited.generated, streamed_wakeups, awaited_wakeups, late_chunks

    chunks, text, streamed_wakeups, awaited_wakeups, late_chunks = asyncio.run(consume())
    assert "".join(chunks) == text and len(chunks) > 10
    assert 1 < streamed_wakeups <= len(chunks) + 2  # at most one wakeup per look, plus the finish
    assert awaited_wakeups == 1  # the finish only: an awaiting handler is not woken per character
    assert late_chunks == [text]  # a reader that fell behind gets what is waiting in one piece


def test_cancel_frees_the_row(engine: Engine) -> None:
    long = engine.submit(GenerationRequest("The ", length=2000, random_seed=1))
    short = [engine.submit(GenerationRequest("The ", length=2000, random_seed=2)) for _ in range(3)]
    while engine.active < 4:
        time.sleep(0.001)
    long.cancel()
    assert long.result(timeout=10).finish_reason == "cancelled"
    assert len(long.result().generated) < 2000
    deadline = time.time() + 5
    while engine.active != 3 and time.time() < deadline:
        time.sleep(0.001)
    steps_before, rows_before = engine.stats["steps"], engine.stats["batch_rows"]
    time.sleep(0.05)
    steps, rows = engine.stats["steps"] - steps_before, engine.stats["batch_rows"] - rows_before
    assert steps > 0 and rows == 3 * steps  # the next steps ran with three rows
    for g in short:
        g.cancel()


def test_deadline_expiry(engine: Engine) -> None:
    result = engine.generate(GenerationRequest("The ", length=2000, timeout=0.02, random_seed=1))
    assert result.finish_reason == "timeout"
    assert len(result.generated) < 2000


def test_queue_full_is_refused_at_once(tiny: Checkpoint) -> None:
    with Engine(tiny.model, tiny.vocab, EngineLimits(max_batch=1, max_queue=2)) as eng:
        running = eng.submit(GenerationRequest("The ", length=2000))
        while eng.active < 1:
            time.sleep(0.001)
        queued = [eng.submit(GenerationRequest("The ", length=5)) for _ in range(2)]
        started = time.perf_counter()
        with pytest.raises(QueueFullError):
            eng.submit(GenerationRequest("The ", length=5))
        assert time.perf_counter() - started < 0.1
        running.cancel()
        assert all(q.result(timeout=10).finish_reason == "length" for q in queued)


@pytest.mark.parametrize(
    "request_, field",
    [
        (GenerationRequest(""), "seed"),
        (GenerationRequest("The €"), "seed"),
        (GenerationRequest("The", length=0), "length"),
        (GenerationRequest("The", length=10**6), "length"),
        (GenerationRequest("The", scale_factor=0.0), "scale_factor"),
        (GenerationRequest("The", scale_factor=float("nan")), "scale_factor"),
        (GenerationRequest("The", top_k=0), "top_k"),
        (GenerationRequest("The", top_p=1.5), "top_p"),
        (GenerationRequest("The", stop=("a", "b", "c", "d", "e")), "stop"),
        (GenerationRequest("The", random_seed=-1), "random_seed"),
    ],
)
def test_invalid_requests_name_the_field(engine: Engine, request_: GenerationRequest, field: str) -> None:
    with pytest.raises(RequestError) as info:
        engine.submit(request_)
    assert info.value.field == field


def test_unknown_seed_characters_are_named(engine: Engine) -> None:
    with pytest.raises(RequestError) as info:
        engine.submit(GenerationRequest("The €¥"))
    assert info.value.chars == ["¥", "€"]


def test_one_failing_request_does_not_disturb_the_others(tiny: Checkpoint, engine: Engine, monkeypatch) -> None:
    requests = [GenerationRequest("The ", length=200, random_seed=s) for s in range(6)]
    expected = [solo(tiny, r) for r in requests]
    original = Engine._advance

    def flaky(self: Engine, row):  # a bug that hits one row only
        if row.gen.random_seed == 3 and len(row.generated) == 50:
            raise ZeroDivisionError("boom")
        return original(self, row)

    monkeypatch.setattr(Engine, "_advance", flaky)
    gens = [engine.submit(r) for r in requests]
    for i, gen in enumerate(gens):
        if i == 3:
            with pytest.raises(GenerationFailed, match="boom"):
                gen.result(timeout=30)
        else:
            assert gen.result(timeout=30).text == expected[i]
    assert engine.generate(GenerationRequest("The ", length=20)).finish_reason == "length"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_memory_does_not_grow_across_2000_requests(engine: Engine) -> None:
    def burst(n: int) -> None:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda s: engine.generate(GenerationRequest("The ", length=20, random_seed=s)), range(n)))

    burst(200)  # warm up allocator caches
    before = rss_bytes()
    burst(2000)
    grown = rss_bytes() - before
    assert grown < 16 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 2000 requests"


def test_shutdown_with_work_in_flight(tiny: Checkpoint) -> None:
    eng = Engine(tiny.model, tiny.vocab, EngineLimits(max_batch=2))
    short = eng.submit(GenerationRequest("The ", length=30))
    endless = [eng.submit(GenerationRequest("The ", length=2000)) for _ in range(3)]
    closer = threading.Thread(target=eng.close, kwargs={"grace": 0.2})
    closer.start()
    closer.join(timeout=10)
    assert not closer.is_alive() and not eng._thread.is_alive()
    assert short.result(timeout=1).finish_reason == "length"
    outcomes = []
    for gen in endless:
        try:
            outcomes.append(gen.result(timeout=1).finish_reason)
        except EngineClosedError:
            outcomes.append("refused")
    assert set(outcomes) <= {"cancelled", "refused", "length"} and "length" not in outcomes[-1:]
    with pytest.raises(EngineClosedError):
        eng.submit(GenerationRequest("The "))


def test_a_huge_seed_does_not_stall_short_requests(tiny: Checkpoint, engine: Engine) -> None:
    huge_seed = ("The engineer and the sailor walked along the shore. " * 200)[:10_000]
    huge = engine.submit(GenerationRequest(huge_seed, length=5, random_seed=1))
    short = engine.submit(GenerationRequest("The ", length=5, random_seed=1))
    assert short.result(timeout=30).finish_reason == "length"
    assert huge.result(timeout=30).finish_reason == "length"
    assert short.first_char_at is not None and huge.first_char_at is not None
    assert short.first_char_at < huge.first_char_at  # it was served while the long seed prefilled
    assert huge.result().text == solo(tiny, huge.request)  # chunked prefill is still reproducible
