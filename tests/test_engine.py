import asyncio
import concurrent.futures
import threading
import time
from typing import Any

import pytest
import torch

from charlm import native
from charlm.checkpoint import Checkpoint
from charlm.decoder import Decoder
from charlm.engine import Engine, EngineHooks
from charlm.handles import Generation
from charlm.model import CharLSTM, ModelConfig
from charlm.request import (
    EngineClosedError,
    EngineLimits,
    GenerationFailed,
    GenerationRequest,
    QueueFullError,
    RequestError,
    ScoreRequest,
    ScoringStopped,
)
from charlm.sampling import MAX_SCALE_FACTOR, MAX_TOP_K, InvalidParameter, SamplingParams

# Longer than any test waits for on any machine: work that ends only when the test ends it.
ENDLESS = 10**9


def engine_with(tiny: Checkpoint, hooks: EngineHooks | None = None) -> Engine:
    """The `engine` fixture's engine, with `hooks`."""
    return Engine(tiny.model, tiny.vocab, EngineLimits(max_batch=64, max_queue=256), hooks=hooks)


@pytest.fixture()
def engine(tiny: Checkpoint):
    with engine_with(tiny) as eng:
        yield eng


def hold_the_row(engine: Engine) -> Generation:
    """An endless generation, returned once it holds a row: with max_batch 1, later requests must queue."""
    running = engine.submit(GenerationRequest("The ", length=ENDLESS))
    while engine.active < 1:
        time.sleep(0.001)
    return running


class Pacer:
    """Engine hooks that let the worker take a decode step only for each `release()` (one step of slack),
    so a reader that releases one per chunk sees the text in many pieces however fast the machine
    decodes; after `stop()` the worker runs freely again."""

    def __init__(self) -> None:
        self._steps = threading.Semaphore(1)
        self._paced = True
        self.hooks = EngineHooks(before_step=self._before_step)

    def _before_step(self) -> None:
        if self._paced:
            self._steps.acquire()

    def release(self) -> None:
        self._steps.release()

    def stop(self) -> None:
        self._paced = False
        self._steps.release()  # a worker waiting for its next step goes on


def count_model_calls(engine: Engine) -> list[int]:
    """Count the engine's calls of its model (prefill chunks through nn.LSTM) in the returned one-item list."""
    calls, model = [0], engine.model

    def counting(*args: Any) -> Any:
        calls[0] += 1
        return model(*args)

    engine.model = counting  # type: ignore[assignment]
    return calls


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
            sampling=SamplingParams(0.5 + (i % 5) * 0.4, [None, 5, 20][i % 3], [None, 0.9][i % 2]),
            random_seed=1000 + i,
        )
        for i in range(64)
    ]
    with Engine(tiny.model, tiny.vocab, EngineLimits(max_batch=64), use_native=use_native) as engine:
        assert engine.native == use_native
        gens = [engine.submit(r) for r in requests]
        together = [g.result(timeout=120).text for g in gens]
        assert engine.stats.batch_rows / engine.stats.steps > 30  # they really were batched
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
    assert result.usage.generated_chars == first


def test_streaming_yields_the_generated_text(tiny: Checkpoint) -> None:
    pacer = Pacer()
    with engine_with(tiny, pacer.hooks) as engine:
        gen = engine.submit(GenerationRequest("The ", length=120, random_seed=3))
        chunks = []
        for chunk in gen:
            chunks.append(chunk)
            pacer.release()
    assert len(chunks) > 10 and "".join(chunks) == gen.result().generated
    timings = gen.result().timings
    assert timings.generate_ms > 0 and timings.chars_per_s > 0 and timings.queue_ms >= 0


def test_async_consumers_streamed_per_chunk_awaited_once(tiny: Checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    pacer = Pacer()

    async def consume(engine: Engine) -> tuple[list[str], str, int, int, list[str]]:
        loop = asyncio.get_running_loop()
        wakeups = 0
        schedule = loop.call_soon_threadsafe

        def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal wakeups
            wakeups += 1
            return schedule(*args, **kwargs)

        monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
        streamed = engine.submit(GenerationRequest("The ", length=200, random_seed=4))
        chunks = []
        async for chunk in streamed:
            chunks.append(chunk)
            pacer.release()
        pacer.stop()
        streamed_wakeups, wakeups = wakeups, 0
        awaited = await engine.submit(GenerationRequest("The ", length=200, random_seed=4)).wait()
        awaited_wakeups = wakeups
        late = engine.submit(GenerationRequest("The ", length=200, random_seed=4))
        while not late.done():
            await asyncio.sleep(0.01)
        late_chunks = [chunk async for chunk in late]
        return chunks, awaited.generated, streamed_wakeups, awaited_wakeups, late_chunks

    with engine_with(tiny, pacer.hooks) as engine:
        chunks, text, streamed_wakeups, awaited_wakeups, late_chunks = asyncio.run(consume(engine))
    assert "".join(chunks) == text and len(chunks) >= 100  # about one piece per step
    assert 1 < streamed_wakeups <= len(chunks) + 2  # at most one wakeup per look, plus the finish
    assert awaited_wakeups == 1  # the finish only: an awaiting handler is not woken per character
    assert late_chunks == [text]  # a reader that fell behind gets what is waiting in one piece


def test_cancel_frees_the_row(tiny: Checkpoint) -> None:
    with Engine(tiny.model, tiny.vocab, EngineLimits(max_batch=64, max_length=ENDLESS)) as engine:
        gens = [engine.submit(GenerationRequest("The ", length=ENDLESS, random_seed=s)) for s in range(4)]
        while engine.active < 4:
            time.sleep(0.001)
        gens[0].cancel()
        result = gens[0].result(timeout=60)
        assert result.finish_reason == "cancelled" and len(result.generated) < ENDLESS
        while engine.active != 3:
            time.sleep(0.001)
        rows_before, steps_before = engine.stats.batch_rows, engine.stats.steps
        while engine.stats.steps < steps_before + 20:
            time.sleep(0.001)
        steps, rows = engine.stats.steps - steps_before, engine.stats.batch_rows - rows_before
        assert abs(rows - 3 * steps) <= 3  # the next steps ran with three rows (± the step being counted)
        for g in gens[1:]:
            g.cancel()


def test_cancelling_a_queued_request_frees_its_place_at_once(tiny: Checkpoint) -> None:
    with Engine(tiny.model, tiny.vocab, EngineLimits(max_batch=1, max_queue=2, max_length=ENDLESS)) as eng:
        running = hold_the_row(eng)
        queued = [eng.submit(GenerationRequest("The ", length=5)) for _ in range(2)]
        with pytest.raises(QueueFullError):
            eng.submit(GenerationRequest("The ", length=5))
        for gen in queued:
            gen.cancel()
        # Finished by the cancel itself, while the worker is still busy with the endless request.
        assert all(g.done() and g.result().finish_reason == "cancelled" for g in queued)
        assert eng.queue_depth == 0 and not running.done()
        again = eng.submit(GenerationRequest("The ", length=5, random_seed=1))  # no longer 429
        running.cancel()
        assert again.result(timeout=60).finish_reason == "length"
        assert eng.stats.cancelled == 3


def test_deadline_expiry(tiny: Checkpoint) -> None:
    with Engine(tiny.model, tiny.vocab, EngineLimits(max_length=ENDLESS)) as engine:
        result = engine.generate(GenerationRequest("The ", length=ENDLESS, timeout=0.02, random_seed=1))
    assert result.finish_reason == "timeout"
    assert len(result.generated) < ENDLESS


def test_queue_full_is_refused_at_once(tiny: Checkpoint) -> None:
    with Engine(tiny.model, tiny.vocab, EngineLimits(max_batch=1, max_queue=2, max_length=ENDLESS)) as eng:
        running = hold_the_row(eng)
        queued = [eng.submit(GenerationRequest("The ", length=5)) for _ in range(2)]
        with pytest.raises(QueueFullError):
            eng.submit(GenerationRequest("The ", length=5))
        assert not running.done()  # refused while the queue was full, not after waiting for room
        running.cancel()
        assert all(q.result(timeout=60).finish_reason == "length" for q in queued)


@pytest.mark.parametrize(
    "request_, field",
    [
        (GenerationRequest(""), "seed"),
        (GenerationRequest("The €"), "seed"),
        (GenerationRequest("The", length=0), "length"),
        (GenerationRequest("The", length=10**6), "length"),
        (GenerationRequest("The", length=True), "length"),
        (GenerationRequest("The", length=2.0), "length"),  # type: ignore[arg-type]
        (GenerationRequest("The", stop=("a", "b", "c", "d", "e")), "stop"),
        (GenerationRequest("The", random_seed=-1), "random_seed"),
        (GenerationRequest("The", random_seed=False), "random_seed"),
        (GenerationRequest("The", random_seed=2**63), "random_seed"),
    ],
)
def test_invalid_requests_name_the_field(engine: Engine, request_: GenerationRequest, field: str) -> None:
    with pytest.raises(RequestError) as info:
        engine.submit(request_)
    assert info.value.field == field


@pytest.mark.parametrize(
    "options, field",
    [
        ({"scale_factor": 0.0}, "scale_factor"),
        ({"scale_factor": float("nan")}, "scale_factor"),
        ({"scale_factor": 3.5e38}, "scale_factor"),  # overflows float32 in the samplers
        ({"scale_factor": MAX_SCALE_FACTOR * 1.01}, "scale_factor"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2**63}, "top_k"),  # overflowed the PyTorch path's tensor, truncated in C
        ({"top_k": MAX_TOP_K + 1}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_sampling_settings_name_the_field_and_the_range(options: dict, field: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        SamplingParams(**options)
    assert info.value.field == field


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "torch"])
def test_extreme_sampling_settings_in_range_behave(tiny: Checkpoint, use_native: bool) -> None:
    """The largest top_k filters nothing; the largest scale_factor picks the most likely character
    (greedy text, not overflow garbage); neither disturbs the requests decoded beside them."""
    ordinary = [GenerationRequest("The ", length=80, random_seed=s) for s in range(6)]
    expected = [solo(tiny, r, use_native) for r in ordinary]
    widest = GenerationRequest("The ", length=80, random_seed=7, sampling=SamplingParams(top_k=MAX_TOP_K))
    sharpest = GenerationRequest("The ", length=80, random_seed=7, sampling=SamplingParams(MAX_SCALE_FACTOR))
    with Engine(tiny.model, tiny.vocab, EngineLimits(max_batch=16), use_native=use_native) as eng:
        gens = [eng.submit(r) for r in [widest, sharpest, *ordinary]]
        texts = [g.result(timeout=60).text for g in gens]
    assert texts[0] == solo(tiny, GenerationRequest("The ", length=80, random_seed=7), use_native)
    assert texts[1] == "The " + greedy(tiny, "The ", 80)
    assert texts[2:] == expected


def greedy(tiny: Checkpoint, seed: str, length: int) -> str:
    """Argmax decoding straight from nn.LSTM, independent of the engine."""
    with torch.inference_mode():
        logits, state, _ = tiny.model(tiny.vocab.encode(seed)[None])
        out = []
        for _ in range(length):
            token = int(logits[0, -1].argmax())
            out.append(tiny.vocab.chars[token])
            logits, state, _ = tiny.model(torch.tensor([[token]]), state)
    return "".join(out)


def test_unknown_seed_characters_are_named(engine: Engine) -> None:
    with pytest.raises(RequestError) as info:
        engine.submit(GenerationRequest("The €¥"))
    assert info.value.chars == ["¥", "€"]


def test_one_failing_request_does_not_disturb_the_others(tiny: Checkpoint) -> None:
    requests = [GenerationRequest("The ", length=200, random_seed=s) for s in range(6)]
    expected = [solo(tiny, r) for r in requests]

    def flaky(gen: Generation, position: int) -> None:  # a bug that hits one row only
        if gen.random_seed == 3 and position == 50:
            raise ZeroDivisionError("boom")

    with engine_with(tiny, EngineHooks(on_char=flaky)) as engine:
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


def test_memory_does_not_grow_with_the_number_of_seed_lengths(tiny: Checkpoint) -> None:
    """oneDNN keeps a compiled primitive per sequence length nn.LSTM is given (0.6 MiB each here, up to
    1,024): seeds and texts of 300 different lengths grew the process by 185 MiB before chunks were cut
    to 10 lengths (charlm/jobs.py chunk_end)."""
    from tests.conftest import make_corpus

    text = make_corpus(200, seed=11)
    limits = EngineLimits(max_seed_chars=5000, max_score_chars=5000)
    with Engine(tiny.model, tiny.vocab, limits) as eng:
        eng.generate(GenerationRequest(text[:1024], length=2))  # every piece length once: 512, 256, ... 1
        eng.score(ScoreRequest(text[:1025])).result(timeout=60)
        before = rss_bytes()
        for n in range(600, 900):
            eng.generate(GenerationRequest(text[:n], length=2, random_seed=1))
            eng.score(ScoreRequest(text[:n])).result(timeout=60)
        grown = rss_bytes() - before
    assert grown < 24 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 300 seed lengths"


def test_close_lets_in_flight_work_finish_within_the_grace(tiny: Checkpoint) -> None:
    eng = Engine(tiny.model, tiny.vocab, EngineLimits(max_batch=2))
    gens = [eng.submit(GenerationRequest("The ", length=300, random_seed=s)) for s in range(3)]
    eng.close(grace=600)  # returns as soon as the work is done, long before the grace ends
    assert [g.result(timeout=1).finish_reason for g in gens] == ["length"] * 3
    assert eng.closed and not eng._scheduler.alive


def test_close_waits_for_a_job_between_the_queue_and_its_row(tiny: Checkpoint) -> None:
    in_transit, release = threading.Event(), threading.Event()

    def held(gen: Generation, position: int) -> None:
        if position == 0:  # its first character: the worker has taken the job off the queue, no row yet
            in_transit.set()
            release.wait()

    eng = Engine(tiny.model, tiny.vocab, EngineLimits(max_batch=2), hooks=EngineHooks(on_char=held))
    gen = eng.submit(GenerationRequest("The ", length=20, random_seed=1))
    assert in_transit.wait(timeout=60)
    closer = threading.Thread(target=eng.close, kwargs={"grace": 600})
    closer.start()
    closer.join(timeout=0.5)  # time for a close that overlooks the job to give up on it (it must not)
    release.set()
    closer.join(timeout=600)
    assert gen.result(timeout=1).finish_reason == "length"


def test_shutdown_with_work_in_flight(tiny: Checkpoint) -> None:
    eng = Engine(tiny.model, tiny.vocab, EngineLimits(max_batch=2, max_length=ENDLESS))
    short = eng.submit(GenerationRequest("The ", length=30))
    assert short.result(timeout=60).finish_reason == "length"
    endless = [eng.submit(GenerationRequest("The ", length=ENDLESS)) for _ in range(3)]  # 2 decode, 1 waits
    eng.close(grace=0.2)  # the endless work cannot finish: the grace runs out whatever the machine's speed
    assert eng.closed and not eng._scheduler.alive
    for gen in endless:  # each ends with an error its caller can report, decoding or still queued
        with pytest.raises(EngineClosedError):
            gen.result(timeout=1)
    assert eng.stats.cancelled == 3
    with pytest.raises(EngineClosedError):
        eng.submit(GenerationRequest("The "))
    eng.close(grace=0.2)  # a second close is harmless


def test_a_huge_seed_does_not_stall_short_requests(tiny: Checkpoint, engine: Engine) -> None:
    huge_seed = ("The engineer and the sailor walked along the shore. " * 200)[:10_000]
    huge = engine.submit(GenerationRequest(huge_seed, length=5, random_seed=1))
    short = engine.submit(GenerationRequest("The ", length=5, random_seed=1))
    assert short.result(timeout=30).finish_reason == "length"
    assert huge.result(timeout=30).finish_reason == "length"
    assert short.first_char_at is not None and huge.first_char_at is not None
    assert short.first_char_at < huge.first_char_at  # it was served while the long seed prefilled
    assert huge.result().text == solo(tiny, huge.request)  # chunked prefill is still reproducible


# --- greedy decoding, log-probabilities, shared prefills, scoring ---

GREEDY = SamplingParams(greedy=True)


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "torch"])
def test_greedy_is_argmax_decoding_alone_and_among_30_others(tiny: Checkpoint, use_native: bool) -> None:
    long_seed = "The sailor and the engineer walked along the shore " * 3  # > SHORT_SEED: the chunked prefill
    greedy_requests = [GenerationRequest(seed, length=150, sampling=GREEDY, random_seed=s)
                       for seed, s in (("The ", 1), ("wood", 2), (long_seed, 3))]
    others = [
        GenerationRequest(["The ", "The engineer", "wood", long_seed][i % 4], length=150 + 3 * i,
                          sampling=SamplingParams(0.5 + (i % 4) * 0.5, [None, 5][i % 2]), random_seed=100 + i)
        for i in range(30)
    ]
    expected = [req.seed + greedy(tiny, req.seed, 150) for req in greedy_requests]
    assert [solo(tiny, req, use_native) for req in greedy_requests] == expected
    with Engine(tiny.model, tiny.vocab, EngineLimits(max_batch=64), use_native=use_native) as eng:
        gens = eng.submit_many([*others[:15], *greedy_requests, *others[15:]])
        texts = [g.result(timeout=120).text for g in gens]
        assert eng.stats.batch_rows / eng.stats.steps > 20  # they really were decoded together
    assert texts[15:18] == expected
    # The greedy rows did not change their neighbours' texts either (a sample of them, for time).
    sampled = {0: others[0], 14: others[14], 18: others[15], 32: others[29]}  # position in texts: request
    assert {i: texts[i] for i in sampled} == {i: solo(tiny, r, use_native) for i, r in sampled.items()}


def test_greedy_ignores_the_random_seed_and_the_other_settings(engine: Engine) -> None:
    texts = {
        engine.generate(GenerationRequest("The ", length=100, random_seed=s,
                                          sampling=SamplingParams(scale, top_k, top_p, greedy=True))).text
        for s, scale, top_k, top_p in ((1, 1.0, None, None), (2, 0.1, 3, 0.5), (3, 50.0, 1, 1.0))
    }
    assert len(texts) == 1


def nn_lstm_logprobs(tiny: Checkpoint, text: str) -> torch.Tensor:
    """log-softmax of nn.LSTM's logits over `text`: row t is the distribution of character t + 1."""
    with torch.inference_mode():
        logits, _, _ = tiny.model(tiny.vocab.encode(text)[None])
    return logits[0].double().log_softmax(-1)


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "torch"])
def test_logprobs_are_the_models_and_do_not_change_the_text(tiny: Checkpoint, use_native: bool) -> None:
    request = GenerationRequest("The engineer", length=120, random_seed=9, sampling=SamplingParams(1.5, top_k=10))
    with Engine(tiny.model, tiny.vocab, EngineLimits(max_batch=8), use_native=use_native) as eng:
        plain = eng.generate(request)
        gen = eng.submit(GenerationRequest(**{**request.__dict__, "logprobs": 3}))
        streamed = "".join(gen)
        result = gen.result(timeout=60)
    assert result.text == plain.text and plain.logprobs is None
    assert result.logprobs is not None and len(result.logprobs) == len(result.generated) == len(streamed)
    assert gen.logprobs == result.logprobs  # what a streaming reader saw, in step with the characters
    logp = nn_lstm_logprobs(tiny, result.text)
    for i, entry in enumerate(result.logprobs):
        row = logp[len(request.seed) - 1 + i]
        assert entry.char == result.generated[i]
        assert entry.logprob == pytest.approx(float(row[tiny.vocab.encode(entry.char)[0]]), abs=1e-4)
        best = row.topk(3)
        assert [c for c, _ in entry.top] == [tiny.vocab.chars[int(j)] for j in best.indices]
        assert [v for _, v in entry.top] == pytest.approx(best.values.tolist(), abs=1e-4)


def test_logprobs_are_computed_only_for_rows_that_ask(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    import charlm.logprobs as logprobs_module

    rows_scored: list[int] = []
    original = logprobs_module.char_logprobs

    def spy(logp: torch.Tensor, *args: Any) -> Any:
        rows_scored.append(logp.size(0))
        return original(logp, *args)

    monkeypatch.setattr(logprobs_module, "char_logprobs", spy)
    plain = [engine.submit(GenerationRequest("The ", length=80, random_seed=s)) for s in range(8)]
    assert all(g.result(timeout=60).logprobs is None for g in plain)
    assert rows_scored == []  # no softmax, no sort, not even a call, while nobody asks
    mixed = engine.submit_many([GenerationRequest("The ", length=80, random_seed=s, logprobs=2 if s == 3 else None)
                                for s in range(8)])
    results = [g.result(timeout=60) for g in mixed]
    assert rows_scored and max(rows_scored) == 1  # one row of each batch: the one that asked
    assert len(results[3].logprobs or []) == 80 and results[3].text == plain[3].result().text
    while engine.active:  # the last row retires after its result is handed out
        time.sleep(0.001)
    assert engine._asking == 0  # the count that lets a step skip the look at every row


def test_stop_strings_cut_the_logprobs_with_the_text(engine: Engine) -> None:
    base = engine.generate(GenerationRequest("The ", length=300, random_seed=5)).generated
    stop = base[40:43]
    result = engine.generate(GenerationRequest("The ", length=300, random_seed=5, stop=(stop,), logprobs=0))
    assert result.finish_reason == "stop" and result.generated == base[: base.index(stop)]
    assert result.logprobs is not None and "".join(e.char for e in result.logprobs) == result.generated
    assert all(e.top == () for e in result.logprobs)


def test_requests_with_the_same_long_seed_share_one_prefill(tiny: Checkpoint) -> None:
    seed = ("The engineer and the sailor walked along the shore. " * 16)[:768]  # a chunk of 512, then one of 256
    requests = [GenerationRequest(seed, length=40, random_seed=s) for s in range(3)]
    expected = [solo(tiny, r) for r in requests]
    with Engine(tiny.model, tiny.vocab, EngineLimits(max_batch=8)) as eng:
        calls = count_model_calls(eng)
        texts = [g.result(timeout=60).text for g in eng.submit_many(requests)]
    assert texts == expected
    assert calls == [2]  # the seed's two chunks once, not once per request


def test_a_cancelled_request_hands_its_prefill_to_the_next_with_the_same_seed(tiny: Checkpoint) -> None:
    seed = ("The engineer and the sailor walked along the shore. " * 40)[:2000]
    requests = [GenerationRequest(seed, length=30, random_seed=s) for s in range(3)]
    with Engine(tiny.model, tiny.vocab, EngineLimits(max_batch=8)) as eng:
        gens = eng.submit_many(requests)
        gens[0].cancel()  # before, during or after its prefill: the others finish the same way
        results = [g.result(timeout=60) for g in gens]
    assert results[0].finish_reason == "cancelled"
    assert [r.text for r in results[1:]] == [solo(tiny, r) for r in requests[1:]]


def test_submit_many_queues_all_or_none(tiny: Checkpoint) -> None:
    with Engine(tiny.model, tiny.vocab, EngineLimits(max_batch=1, max_queue=3, max_length=ENDLESS)) as eng:
        running = hold_the_row(eng)
        waiting = eng.submit(GenerationRequest("The ", length=5))
        with pytest.raises(QueueFullError, match="needs 3 places"):
            eng.submit_many([GenerationRequest("The ", length=5)] * 3)
        assert eng.queue_depth == 1  # none of the three was queued
        with pytest.raises(RequestError) as info:
            eng.submit_many([GenerationRequest("The ", length=5), GenerationRequest("The €", length=5)])
        assert info.value.field == "seed" and eng.queue_depth == 1
        running.cancel()
        assert waiting.result(timeout=60).finish_reason == "length"


def corpus_text(tiny: Checkpoint, chars: int) -> str:
    from tests.conftest import make_corpus

    return make_corpus(400, seed=7)[:chars]


def test_scoring_matches_the_trainers_evaluation(tiny: Checkpoint, engine: Engine) -> None:
    from charlm.evaluate import evaluate

    text = corpus_text(tiny, 1500)  # three chunks
    result = engine.score(ScoreRequest(text, top_k=5)).result(timeout=60)
    expected = evaluate(tiny.model, tiny.vocab.encode(text))
    assert result.chars == expected["chars"] == len(text) - 1
    assert result.bits_per_char == pytest.approx(expected["bpc"], abs=1e-6)
    assert result.logprob == pytest.approx(-expected["nats"] * expected["chars"], rel=1e-6)
    assert [e.char for e in result.per_char] == list(text)
    assert result.per_char[0].logprob is None and all(e.logprob is not None for e in result.per_char[1:])
    logp = nn_lstm_logprobs(tiny, text)
    for t in (1, 511, 512, 513, 1499):  # around the chunk boundaries
        entry = result.per_char[t]
        assert entry.logprob == pytest.approx(float(logp[t - 1, tiny.vocab.encode(text[t])[0]]), abs=1e-5)
        assert len(entry.top) == 5 and [v for _, v in entry.top] == sorted((v for _, v in entry.top), reverse=True)


def test_scoring_a_long_text_does_not_stall_generation(tiny: Checkpoint, engine: Engine) -> None:
    text = corpus_text(tiny, 10_000)  # twenty chunks
    scoring = engine.score(ScoreRequest(text))
    short = engine.submit(GenerationRequest("The ", length=5, random_seed=1))
    assert short.result(timeout=60).finish_reason == "length"
    result = scoring.result(timeout=60)
    assert short.first_char_at is not None and scoring.finished_at is not None
    assert short.first_char_at < scoring.finished_at  # served between the text's chunks
    assert result.chars == 9_999 and short.result().text == solo(tiny, short.request)


@pytest.mark.parametrize(
    "request_, field",
    [
        (ScoreRequest("T"), "text"),
        (ScoreRequest(""), "text"),
        (ScoreRequest("The €"), "text"),
        (ScoreRequest("The " * 3000), "text"),
        (ScoreRequest("The", top_k=6), "top_k"),
        (ScoreRequest("The", top_k=-1), "top_k"),
        (ScoreRequest("The", top_k=True), "top_k"),
        (ScoreRequest("The", timeout=0), "timeout"),
    ],
)
def test_invalid_scoring_requests_name_the_field(engine: Engine, request_: ScoreRequest, field: str) -> None:
    with pytest.raises(RequestError) as info:
        engine.score(request_)
    assert info.value.field == field


@pytest.mark.parametrize("logprobs", [-1, 6, True])
def test_logprobs_out_of_range_are_refused(engine: Engine, logprobs: int) -> None:
    with pytest.raises(RequestError) as info:
        engine.submit(GenerationRequest("The ", logprobs=logprobs))
    assert info.value.field == "logprobs"


def test_a_scoring_job_ends_when_cancelled_or_out_of_time(tiny: Checkpoint) -> None:
    with Engine(tiny.model, tiny.vocab, EngineLimits(max_batch=1, max_length=ENDLESS)) as eng:
        running = hold_the_row(eng)
        queued = eng.score(ScoreRequest("The engineer"))  # waits: the only row is taken
        queued.cancel()
        with pytest.raises(ScoringStopped) as stopped:
            queued.result(timeout=1)
        assert stopped.value.reason == "cancelled" and eng.queue_depth == 0
        late = eng.score(ScoreRequest("The engineer", timeout=1e-9))
        running.cancel()
        with pytest.raises(ScoringStopped) as stopped:
            late.result(timeout=60)
        assert stopped.value.reason == "timeout" and not stopped.value.started  # it only waited
        assert eng.score(ScoreRequest("The engineer")).result(timeout=60).chars == 11


def test_a_scoring_timeout_says_whether_the_text_had_started(tiny: Checkpoint) -> None:
    # The worker scores the text's first chunks, then waits before its next decode step while the
    # timeout passes: the job ends as one that started, and so is too long for the timeout. A machine
    # too slow to score one chunk before the timeout gets a longer timeout, not a failure.
    limits = EngineLimits(max_batch=2, max_length=ENDLESS, max_score_chars=4000)
    for timeout in (0.5, 2.0, 8.0, 32.0):
        pacer = Pacer()
        with Engine(tiny.model, tiny.vocab, limits, hooks=pacer.hooks) as eng:
            running = eng.submit(GenerationRequest("The ", length=ENDLESS))
            chunks = count_model_calls(eng)  # the short seed is prefilled without the model: scoring only
            long = eng.score(ScoreRequest(("the island " * 300)[:3000], timeout=timeout))
            pacer.release()
            assert long.deadline is not None
            while time.perf_counter() <= long.deadline:
                time.sleep(0.01)
            began = chunks[0] > 0  # read while the worker waits before a step, once the timeout has passed
            pacer.stop()
            with pytest.raises(ScoringStopped) as stopped:
                long.result(timeout=60)
            running.cancel()
        if began:
            break
    assert began and stopped.value.reason == "timeout" and stopped.value.started


def test_greedy_logprobs_and_shared_prefills_on_the_path_cuda_takes(tiny: Checkpoint,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # No row-invariant kernel: every seed is prefilled through nn.LSTM, and same seeds still share it.
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    requests = [GenerationRequest("The engineer", length=60, sampling=GREEDY, random_seed=s, logprobs=1)
                for s in range(3)]
    with Engine(tiny.model, tiny.vocab, EngineLimits(max_batch=8), use_native=False) as eng:
        assert not eng._decoder.row_invariant
        calls = count_model_calls(eng)
        results = [g.result(timeout=60) for g in eng.submit_many(requests)]
        scored = eng.score(ScoreRequest("The engineer", top_k=2)).result(timeout=60)
    assert {r.generated for r in results} == {greedy(tiny, "The engineer", 60)}
    # One prefill for the three requests (12 characters: pieces of 8 and 4), one scoring (11: 8, 2, 1).
    assert calls == [5]
    assert all(len(r.logprobs or []) == 60 for r in results) and scored.chars == 11
