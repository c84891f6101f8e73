"""The generation engine: one worker thread owns the model and decodes all requests together.

Each step the worker admits waiting requests (prefilling their seeds), runs one batched LSTM step
for every active row, samples each row from its own random stream, hands each character to its
request, and retires rows that are finished, cancelled or out of time. Requests join between
steps (continuous batching), so nobody waits for another request to end.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from charlm import native
from charlm.decoder import Decoder
from charlm.model import CharLSTM
from charlm.sampling import (
    MAX_RANDOM_SEED,
    InvalidParameter,
    RowSampler,
    SamplingParams,
    new_random_seed,
    sample_rows,
)
from charlm.vocab import UnknownCharactersError, Vocab

__all__ = [
    "Engine",
    "EngineLimits",
    "GenerationRequest",
    "GenerationResult",
    "Generation",
    "Usage",
    "Timings",
    "EngineStats",
    "DEFAULT_LENGTH",
    "RequestError",
    "QueueFullError",
    "EngineClosedError",
    "GenerationFailed",
]

FinishReason = Literal["length", "stop", "cancelled", "timeout"]

DEFAULT_LENGTH = 200  # characters generated when a request does not say; the CLI and the API use it too

# Seeds up to this many characters are prefilled together, through the decoder's batched steps.
SHORT_SEED = 64

# Longer seeds go through nn.LSTM in chunks of this many characters, one budget of them per loop.
PREFILL_CHUNK = 512


class RequestError(InvalidParameter):
    """A request is invalid; `field` names the offending field, `chars` any unknown characters."""

    def __init__(self, field: str, message: str, chars: list[str] | None = None):
        super().__init__(field, message)
        self.chars = chars or []


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit; try again later."""


class EngineClosedError(RuntimeError):
    """The engine is shutting down or stopped and admits no new work."""


class GenerationFailed(RuntimeError):
    """This request failed inside the engine; other requests were not affected."""


@dataclass(frozen=True)
class EngineLimits:
    max_length: int = 2000  # characters generated per request
    max_seed_chars: int = 10_000  # characters of seed text per request
    max_batch: int = 64  # rows decoded together in one step
    max_queue: int = 256  # requests waiting to be admitted before submit() refuses
    max_stop: int = 4  # stop strings per request
    max_stop_chars: int = 64  # characters per stop string


@dataclass(frozen=True)
class GenerationRequest:
    seed: str  # the start text (the seed notebook's word); random seeds are called random_seed
    length: int = DEFAULT_LENGTH
    sampling: SamplingParams = SamplingParams()  # built (and so validated) once, where the request enters
    random_seed: int | None = None
    stop: tuple[str, ...] = ()
    timeout: float | None = None  # seconds from submission; the request then ends with "timeout"


@dataclass(frozen=True)
class Usage:
    seed_chars: int
    generated_chars: int


@dataclass(frozen=True)
class Timings:
    queue_ms: float  # submitted → admitted to a row
    prefill_ms: float  # the seed through the LSTM, and the first character sampled
    generate_ms: float  # the first character → the last
    chars_per_s: float


@dataclass
class GenerationResult:
    text: str  # seed + generated, as the notebook returned it
    generated: str
    finish_reason: FinishReason
    random_seed: int
    usage: Usage
    timings: Timings


@dataclass
class EngineStats:
    """Counters since start; the worker writes them, readers (metrics, tests) only read."""

    steps: int = 0  # batched decode steps
    batch_rows: int = 0  # rows decoded, summed over steps (÷ steps = mean batch)
    completed: int = 0  # ended by length or a stop string
    cancelled: int = 0  # client gone (while decoding or still queued) or shut down
    failed: int = 0
    timeouts: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def validate(request: GenerationRequest, vocab: Vocab, limits: EngineLimits) -> None:
    """Refuse a request with an error naming the field and the limit."""
    if not request.seed:
        raise RequestError("seed", "must contain at least 1 character")
    if len(request.seed) > limits.max_seed_chars:
        raise RequestError("seed", f"has {len(request.seed)} characters; the limit is {limits.max_seed_chars}")
    unknown = vocab.unknown(request.seed)
    if unknown:
        raise RequestError("seed", str(UnknownCharactersError(unknown)), chars=unknown)
    if not _is_int(request.length) or not 1 <= request.length <= limits.max_length:
        raise RequestError("length", f"must be a whole number between 1 and {limits.max_length}, got {request.length}")
    if not isinstance(request.sampling, SamplingParams):
        raise RequestError("sampling", "must be a SamplingParams")
    if request.random_seed is not None and not (
        _is_int(request.random_seed) and 0 <= request.random_seed <= MAX_RANDOM_SEED
    ):
        raise RequestError("random_seed", f"must be a whole number between 0 and {MAX_RANDOM_SEED}")
    if len(request.stop) > limits.max_stop:
        raise RequestError("stop", f"at most {limits.max_stop} strings, got {len(request.stop)}")
    for s in request.stop:
        if not 1 <= len(s) <= limits.max_stop_chars:
            raise RequestError("stop", f"each string must have 1 to {limits.max_stop_chars} characters")
    if request.timeout is not None and not request.timeout > 0:
        raise RequestError("timeout", f"must be > 0 seconds, got {request.timeout}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Generation:
    """A handle on one submitted request: iterate characters, wait for the result, or cancel.

    Usable from threads (`for ch in gen`, `gen.result()`) and from asyncio (`async for`, `await
    gen.wait()`); the worker thread pushes events, consumers never block the worker.
    """

    def __init__(
        self,
        request: GenerationRequest,
        random_seed: int,
        loop: asyncio.AbstractEventLoop | None,
        withdraw: Callable[[Generation], None] | None = None,
    ):
        self.request = request
        self.random_seed = random_seed
        self.submitted = time.perf_counter()
        self.deadline = self.submitted + request.timeout if request.timeout else None
        self.first_char_at: float | None = None
        self._chunks: collections.deque[str] = collections.deque()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._cond = threading.Condition()
        self._cancelled = False
        self._loop = loop
        self._async_event = asyncio.Event() if loop else None
        self._streaming = False  # an `async for` consumer has started: wake its loop for chunks
        self._wake_pending = False  # a wakeup is scheduled on the consumer's loop and not yet seen
        self._withdraw = withdraw  # takes a cancelled request out of the waiting queue at once

    # --- producer side (worker thread) ---
    def _notify(self, wake_loop: bool = True) -> None:
        with self._cond:
            self._cond.notify_all()
        if wake_loop and self._loop and self._async_event and not self._wake_pending:
            self._wake_pending = True  # one wakeup until the consumer looks again, however many chunks
            try:
                self._loop.call_soon_threadsafe(self._async_event.set)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
                pass

    def _emit(self, text: str) -> None:
        if text:
            if self.first_char_at is None:
                self.first_char_at = time.perf_counter()
            self._chunks.append(text)
            # Waking an event loop costs a syscall and a task switch: only for `async for` consumers.
            self._notify(wake_loop=self._streaming)

    def _finish(self, result: GenerationResult | None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self._done.set()
        self._notify()

    # --- consumer side ---
    def cancel(self) -> None:
        """Drop this request: a queued one leaves the queue now (its place is free for the next
        request); a running one frees its row at the worker's next step."""
        if self._cancelled or self._done.is_set():
            return
        self._cancelled = True
        if self._withdraw is not None:
            self._withdraw(self)

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def ended_early(self) -> FinishReason | None:
        """'cancelled' or 'timeout' once the request must stop before its length, else None."""
        if self._cancelled:
            return "cancelled"
        if self.deadline and time.perf_counter() > self.deadline:
            return "timeout"
        return None

    def done(self) -> bool:
        return self._done.is_set()

    def _outcome(self) -> GenerationResult:
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def result(self, timeout: float | None = None) -> GenerationResult:
        if not self._done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        return self._outcome()

    def __iter__(self) -> Iterator[str]:
        while True:
            with self._cond:
                while not self._chunks and not self._done.is_set():
                    self._cond.wait()
            while self._chunks:
                yield self._chunks.popleft()
            if self._done.is_set() and not self._chunks:
                return

    async def wait(self) -> GenerationResult:
        """The result, once done; woken only by the finish, not by every character."""
        assert self._async_event is not None, "submit from the event loop to consume asynchronously"
        while not self._done.is_set():
            self._rearm()
            if not self._done.is_set():
                await self._async_event.wait()
        return self._outcome()

    def _rearm(self) -> None:
        """Before looking for news and then waiting: the next chunk or the finish wakes us again."""
        assert self._async_event is not None
        self._wake_pending = False
        self._async_event.clear()

    async def __aiter__(self) -> AsyncIterator[str]:
        assert self._async_event is not None, "submit from the event loop to consume asynchronously"
        self._streaming = True  # before looking at the chunks, so no chunk can go unannounced
        while True:
            if self._chunks:  # whatever came in since the last look, as one piece: a slow reader
                parts = []  # gets fewer, longer events instead of falling further behind
                while self._chunks:
                    parts.append(self._chunks.popleft())
                yield "".join(parts)
                continue
            if self._done.is_set():
                if self._chunks:
                    continue
                return
            self._rearm()
            if self._chunks or self._done.is_set():
                continue
            await self._async_event.wait()


@dataclass(eq=False)  # identity: jobs are found in the queue by object, never compared by tensors
class _Prefill:
    """A request whose seed is being run through the LSTM, chunk by chunk."""

    gen: Generation
    ids: torch.Tensor
    pos: int = 0
    state: tuple[torch.Tensor, torch.Tensor] | None = None
    seconds: float = 0.0
    admitted: float = field(default_factory=time.perf_counter)


@dataclass
class _Row:
    """An active request's decoding state besides the batched LSTM state."""

    gen: Generation
    sampler: RowSampler
    token: int
    generated: list[str] = field(default_factory=list)
    emitted: int = 0
    admitted: float = 0.0
    prefill_s: float = 0.0
    decode_start: float = 0.0


class Engine:
    """Continuous-batching text generation over one model, on CPU or CUDA."""

    def __init__(self, model: CharLSTM, vocab: Vocab, limits: EngineLimits | None = None, use_native: bool = True):
        """`use_native=False` runs on PyTorch alone even where the native kernels are built."""
        self.model = model.eval()
        self.vocab = vocab
        self.limits = limits or EngineLimits()
        self.device = model.fc.weight.device
        kernels = native.load() if use_native and self.device.type == "cpu" else None
        self._decoder = Decoder(model, self.limits.max_batch, kernels)
        self._sampled = torch.zeros(self.limits.max_batch, dtype=torch.long)  # the native sampler's output
        self._vocab_size = len(vocab)
        self._waiting: collections.deque[Generation] = collections.deque()
        self._rows: list[_Row] = []
        self._prefilling: collections.deque[_Prefill] = collections.deque()
        self._lock = threading.Condition()
        self._accepting = True
        self._stop = False
        self.stats = EngineStats()
        self._stats_lock = threading.Lock()  # finish counters are also written by withdrawing consumers
        self._thread = threading.Thread(target=self._run, name="charlm-engine", daemon=True)
        self._thread.start()

    # --- public API ---
    @property
    def native(self) -> bool:
        """Whether decoding runs in the compiled kernels (else PyTorch alone, several times slower)."""
        return self._decoder.kernels is not None

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._rows)

    def submit(self, request: GenerationRequest) -> Generation:
        """Validate and enqueue; raises RequestError, QueueFullError or EngineClosedError at once."""
        validate(request, self.vocab, self.limits)
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        seed = request.random_seed if request.random_seed is not None else new_random_seed()
        gen = Generation(request, seed, loop, self._withdraw)
        with self._lock:
            if not self._accepting:
                raise EngineClosedError("the engine is shutting down and accepts no new requests")
            if len(self._waiting) >= self.limits.max_queue:
                raise QueueFullError(f"queue is full ({self.limits.max_queue} waiting requests)")
            self._waiting.append(gen)
            self._lock.notify()
        return gen

    def generate(self, request: GenerationRequest, timeout: float | None = None) -> GenerationResult:
        """Submit and wait: the synchronous convenience for scripts and the CLI."""
        return self.submit(request).result(timeout)

    def _withdraw(self, gen: Generation) -> None:
        """Take a cancelled request out of the waiting queue and finish it; if the worker has it
        already, the worker sees the cancellation at its next look."""
        with self._lock:
            try:
                self._waiting.remove(gen)
            except ValueError:
                return
        self._finish_unstarted(gen, time.perf_counter(), "cancelled")

    def close(self, grace: float = 10.0) -> None:
        """Stop admitting; let in-flight work finish for up to `grace` seconds, then end what is
        left with EngineClosedError and stop. Safe to call again (later calls return once stopped)."""
        with self._lock:
            self._accepting = False
            self._lock.notify()
        end = time.monotonic() + grace
        while self._busy() and time.monotonic() < end and self._thread.is_alive():
            time.sleep(0.01)
        with self._lock:
            self._stop = True
            self._lock.notify()
        self._thread.join(timeout=max(grace, 1.0))

    def _busy(self) -> bool:
        return bool(self._rows or self._waiting or self._prefilling)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- worker ---
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not self._stop and not self._busy():
                        self._lock.wait()
                    if self._stop:
                        break
                self._admit()
                if self._rows:
                    self._step()
        unfinished = [row.gen for row in self._rows] + [job.gen for job in self._prefilling]
        with self._lock:
            unfinished += self._waiting
            self._waiting.clear()
        for gen in unfinished:
            self._count("cancelled")
            gen._finish(None, EngineClosedError("the engine shut down before this request finished"))
        self._rows.clear()
        self._prefilling.clear()

    def _admit(self) -> None:
        """Move waiting requests into prefill while rows are free, then prefill.

        Short seeds (up to SHORT_SEED characters) admitted together are prefilled together, through
        the decoder's own steps: 64 simultaneous requests get their first characters after one
        shared pass instead of 64 passes one after another. Longer seeds go through nn.LSTM in
        fixed chunks of PREFILL_CHUNK characters, a budget's worth per loop iteration, so a huge
        seed is interleaved with decode steps instead of stalling them. Which path a seed takes
        and where its chunks end depend only on the seed, so its text never depends on others.
        """
        while short := self._take_waiting():  # requests that came in meanwhile go next, not after a step
            self._prefill_short(short)
        budget = PREFILL_CHUNK
        while self._prefilling and budget > 0:
            job = self._prefilling[0]
            if reason := job.gen.ended_early():
                self._prefilling.popleft()
                self._finish_unstarted(job.gen, job.admitted, reason)
                continue
            try:
                budget -= self._prefill_chunk(job)
            except Exception as exc:  # one bad request must not stop the worker
                if job in self._prefilling:  # it may already have left the queue when it failed
                    self._prefilling.remove(job)
                self._fail([job.gen], f"prefill failed: {exc}")

    def _take_waiting(self) -> list[_Prefill]:
        """Admit waiting requests while rows are free; return the short-seed ones, queue the rest."""
        short: list[_Prefill] = []
        while len(self._rows) + len(short) + len(self._prefilling) < self.limits.max_batch:
            with self._lock:
                if not self._waiting:
                    break
                gen = self._waiting.popleft()
            if reason := gen.ended_early():
                self._finish_unstarted(gen, time.perf_counter(), reason)
                continue
            job = _Prefill(gen, self.vocab.encode(gen.request.seed).to(self.device)[None])
            if self._decoder.row_invariant and job.ids.size(1) <= SHORT_SEED:
                short.append(job)
            else:
                self._prefilling.append(job)
        return short

    def _prefill_short(self, jobs: list[_Prefill]) -> None:
        """Prefill short seeds together in the free decoder rows after the active ones.

        Requests with the same seed (n samples of one prompt) share one prefilled row: its state
        is what each of them would have computed alone, bit for bit.
        """
        by_seed: dict[str, list[_Prefill]] = {}
        for job in jobs:
            by_seed.setdefault(job.gen.request.seed, []).append(job)
        seeds = sorted(by_seed, key=len, reverse=True)  # the decoder wants the longest seed first
        start, stop = len(self._rows), len(self._rows) + len(seeds)
        began = time.perf_counter()
        try:
            logits = self._decoder.prefill(start, [by_seed[s][0].ids[0] for s in seeds])
            h, c = self._decoder.h[:, start:stop].clone(), self._decoder.c[:, start:stop].clone()
            ordered = [job for s in seeds for job in by_seed[s]]
            which = [j for j, s in enumerate(seeds) for _ in by_seed[s]]
            for job in ordered:
                job.seconds = time.perf_counter() - began
            self._start_rows(
                ordered,
                logits[which],
                lambda i, slot: self._decoder.load_row(slot, h[:, which[i]], c[:, which[i]]),
            )
        except Exception as exc:  # before any of them got a row: these requests fail, nothing else
            self._fail([job.gen for job in jobs], f"prefill failed: {exc}")

    def _prefill_chunk(self, job: _Prefill) -> int:
        """Run the next chunk of a seed through nn.LSTM; at its end, sample the first character."""
        chunk = job.ids[:, job.pos : job.pos + PREFILL_CHUNK]
        started = time.perf_counter()
        logits, job.state, _ = self.model(chunk, job.state)
        job.pos += chunk.size(1)
        job.seconds += time.perf_counter() - started
        if job.pos < job.ids.size(1):
            self._prefilling.rotate(-1)  # round robin: a long seed does not hold up short ones
            return chunk.size(1)
        self._prefilling.popleft()
        assert job.state is not None
        h, c = job.state[0][:, 0], job.state[1][:, 0]
        self._start_rows([job], logits[:, -1], lambda _, slot: self._decoder.load_row(slot, h, c))
        return chunk.size(1)

    def _start_rows(self, jobs: list[_Prefill], logits: torch.Tensor, place: Callable[[int, int], None]) -> None:
        """Sample each prefilled job's first character; give the unfinished ones a decode row.

        `place(i, slot)` puts job i's LSTM state into decoder row `slot`.
        """
        rows = []
        for job in jobs:
            req = job.gen.request
            sampler = RowSampler(req.sampling, job.gen.random_seed)
            rows.append(_Row(job.gen, sampler, 0, admitted=job.admitted))
        sampling = time.perf_counter()
        tokens = self._sample(rows, logits).tolist()
        for i, (job, row, token) in enumerate(zip(jobs, rows, tokens)):
            row.token = token
            row.prefill_s = job.seconds + (time.perf_counter() - sampling)
            row.decode_start = time.perf_counter()
            try:
                if self._advance(row):
                    continue
            except Exception as exc:
                self._fail([row.gen], f"generation failed: {exc}")
                continue
            slot = len(self._rows)
            place(i, slot)
            self._decoder.tokens[slot] = token
            self._rows.append(row)

    def _fail(self, gens: list[Generation], message: str) -> None:
        for gen in gens:
            self._count("failed")
            gen._finish(None, GenerationFailed(message))

    def _count(self, outcome: str) -> None:
        with self._stats_lock:
            setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)

    def _finish_unstarted(self, gen: Generation, admitted: float, reason: FinishReason) -> None:
        """End a request that never reached a decode row (cancelled, timed out, or shut down)."""
        self._finish(_Row(gen, RowSampler(SamplingParams(), 0), 0, admitted=admitted), reason)

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """One id per row, each drawn with that row's settings and its own random stream."""
        params = [r.sampler.params for r in rows]
        scale = [p.scale_factor for p in params]
        top_k = [p.top_k_for(self._vocab_size) for p in params]
        top_p = [p.top_p_or_off for p in params]
        uniforms = [r.sampler.uniform() for r in rows]
        kernels = self._decoder.kernels
        if kernels is not None:
            return kernels.sample(logits.float().contiguous(), scale, top_k, top_p, uniforms, self._sampled)
        dev = logits.device
        return sample_rows(
            logits,
            torch.tensor(scale, device=dev),
            torch.tensor(top_k, device=dev),
            torch.tensor(top_p, device=dev),
            torch.tensor(uniforms, dtype=torch.float64),
        )

    def _step(self) -> None:
        n = len(self._rows)
        self.stats.steps += 1
        self.stats.batch_rows += n
        try:
            logits = self._decoder.step(n)
            ids = self._sample(self._rows, logits)
            self._decoder.tokens[:n].copy_(ids)
            tokens = ids.tolist()
        except Exception as exc:  # a failure of the batched step: fail these rows, keep the worker
            self._fail([row.gen for row in self._rows], f"decode step failed: {exc}")
            self._rows.clear()
            return
        retire: list[int] = []
        for i, (row, token) in enumerate(zip(self._rows, tokens)):
            row.token = token
            try:
                if self._advance(row):
                    retire.append(i)
            except Exception as exc:
                self._fail([row.gen], f"generation failed: {exc}")
                retire.append(i)
        for i in reversed(retire):
            self._retire(i)

    def _retire(self, i: int) -> None:
        """Free row i by moving the last active row into its place."""
        last = len(self._rows) - 1
        if i != last:
            self._decoder.move_row(last, i)
            self._rows[i] = self._rows[last]
        self._rows.pop()

    def _advance(self, row: _Row) -> bool:
        """Record the row's newly sampled token; finish the request if it is done. True = retire."""
        gen, req = row.gen, row.gen.request
        if reason := gen.ended_early():
            return self._finish(row, reason)
        row.generated.append(self.vocab.chars[row.token])
        text = "".join(row.generated[-self.limits.max_stop_chars :]) if req.stop else ""
        for s in req.stop:
            if text.endswith(s):
                del row.generated[len(row.generated) - len(s) :]
                return self._finish(row, "stop")
        if len(row.generated) >= req.length:
            return self._finish(row, "length")
        held = _held_back(text, req.stop)
        upto = len(row.generated) - held
        if upto > row.emitted:
            gen._emit("".join(row.generated[row.emitted : upto]))
            row.emitted = upto
        return False

    def _finish(self, row: _Row, reason: FinishReason) -> bool:
        gen = row.gen
        gen._emit("".join(row.generated[row.emitted :]))
        row.emitted = len(row.generated)
        now = time.perf_counter()
        generated = "".join(row.generated)
        decode_s = now - row.decode_start if row.decode_start else 0.0
        self._count({"cancelled": "cancelled", "timeout": "timeouts"}.get(reason, "completed"))
        gen._finish(
            GenerationResult(
                text=gen.request.seed + generated,
                generated=generated,
                finish_reason=reason,
                random_seed=gen.random_seed,
                usage=Usage(seed_chars=len(gen.request.seed), generated_chars=len(generated)),
                timings=Timings(
                    queue_ms=round((row.admitted - gen.submitted) * 1e3, 3),
                    prefill_ms=round(row.prefill_s * 1e3, 3),
                    generate_ms=round(decode_s * 1e3, 3),
                    chars_per_s=round(len(generated) / decode_s, 1) if decode_s > 0 else 0.0,
                ),
            )
        )
        return True


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters might begin a stop string, and so must not be streamed yet."""
    held = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:n]):
                held = n
                break
    return held
