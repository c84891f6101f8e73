"""The generation engine: one worker thread owns the model and decodes all requests together.

Each step the worker admits waiting requests (prefilling their seeds), runs one batched LSTM step
for every active row, samples each row from its own random stream, hands each character to its
request, and retires rows that are finished, cancelled or out of time. Requests join between
steps (continuous batching), so nobody waits for another request to end.

Scoring a text (how likely the model finds each of its characters) is a job of its own in the same
worker: it goes through nn.LSTM in the same chunks as a long seed, interleaved with decode steps.
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

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
    "Handle",
    "ScoreRequest",
    "ScoreResult",
    "Scoring",
    "CharLogprob",
    "Usage",
    "Timings",
    "EngineStats",
    "DEFAULT_LENGTH",
    "MAX_LOGPROBS",
    "RequestError",
    "QueueFullError",
    "EngineClosedError",
    "GenerationFailed",
    "ScoringStopped",
    "validate_text",
]

FinishReason = Literal["length", "stop", "cancelled", "timeout"]

DEFAULT_LENGTH = 200  # characters generated when a request does not say; the CLI and the API use it too

# Seeds up to this many characters are prefilled together, through the decoder's batched steps.
SHORT_SEED = 64

# Longer seeds, and texts to score, go through nn.LSTM in chunks of this many characters, one budget
# of them per loop.
PREFILL_CHUNK = 512

# Most likely alternatives a request may ask for per character (OpenAI's legacy `logprobs` limit):
# each one is a tuple per character kept until the response, so the number is bounded.
MAX_LOGPROBS = 5


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


class ScoringStopped(RuntimeError):
    """A scoring job ended before its text did: `reason` is "timeout" (it ran past its timeout; score
    a shorter text or raise the timeout) or "cancelled" (its caller went away)."""

    def __init__(self, reason: Literal["cancelled", "timeout"]):
        super().__init__(f"scoring was {'cancelled' if reason == 'cancelled' else 'stopped by its timeout'}")
        self.reason = reason


@dataclass(frozen=True)
class EngineLimits:
    max_length: int = 2000  # characters generated per request
    max_seed_chars: int = 10_000  # characters of seed text per request
    max_batch: int = 64  # rows decoded together in one step
    max_queue: int = 256  # requests waiting to be admitted before submit() refuses
    max_stop: int = 4  # stop strings per request
    max_stop_chars: int = 64  # characters per stop string
    max_score_chars: int = 10_000  # characters of text per scoring request


@dataclass(frozen=True)
class CharLogprob:
    """One character and how likely the model found it there: the natural log of its probability under
    the model's own distribution (before scale_factor and filters, so it does not depend on how the
    character was sampled), with the most likely alternatives."""

    char: str
    logprob: float | None  # None for the first character of a scored text: nothing precedes it to predict it
    top: tuple[tuple[str, float], ...] = ()  # (character, logprob), most likely first, ties by id


@dataclass(frozen=True)
class GenerationRequest:
    seed: str  # the start text (the seed notebook's word); random seeds are called random_seed
    length: int = DEFAULT_LENGTH
    sampling: SamplingParams = SamplingParams()  # built (and so validated) once, where the request enters
    random_seed: int | None = None
    stop: tuple[str, ...] = ()
    timeout: float | None = None  # seconds from submission; the request then ends with "timeout"
    # For each generated character its CharLogprob with this many alternatives (0 to MAX_LOGPROBS);
    # None: not computed at all, so requests that do not ask pay nothing for it.
    logprobs: int | None = None


@dataclass(frozen=True)
class ScoreRequest:
    """Score `text`: every character after the first, predicted from all the characters before it."""

    text: str
    top_k: int = 0  # most likely alternatives reported per character, 0 to MAX_LOGPROBS
    timeout: float | None = None  # seconds from submission; the job then ends with ScoringStopped


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
    logprobs: list[CharLogprob] | None = None  # one per generated character, when the request asked


@dataclass
class ScoreResult:
    """How well the model predicts a text, computed as `charlm eval` computes held-out bpc: the state is
    carried over the whole text and each character is predicted from all before it. The first
    character has no prediction (the model has no start-of-text token), so it is context, not scored."""

    text: str
    chars: int  # characters predicted: all but the first
    logprob: float  # their summed log-probability, in nats (<= 0)
    bits_per_char: float  # -logprob / chars / ln 2
    per_char: list[CharLogprob]  # every character of the text, the first with logprob None
    queue_ms: float
    score_ms: float


@dataclass
class EngineStats:
    """Counters since start; the worker writes them, readers (metrics, tests) only read."""

    steps: int = 0  # batched decode steps
    batch_rows: int = 0  # rows decoded, summed over steps (÷ steps = mean batch)
    completed: int = 0  # ended by length or a stop string
    cancelled: int = 0  # client gone (while decoding or still queued) or shut down
    failed: int = 0
    timeouts: int = 0
    scored: int = 0  # scoring jobs completed


def validate_text(field_name: str, text: str, vocab: Vocab, max_chars: int, min_chars: int = 1) -> None:
    """Refuse a text that is too short, too long, or has characters outside the vocabulary (all named)."""
    if not isinstance(text, str):
        raise RequestError(field_name, f"must be a string, got {type(text).__name__}")
    if len(text) < min_chars:
        raise RequestError(field_name, f"must contain at least {min_chars} character{'s' if min_chars > 1 else ''}")
    if len(text) > max_chars:
        raise RequestError(field_name, f"has {len(text)} characters; the limit is {max_chars}")
    unknown = vocab.unknown(text)
    if unknown:
        raise RequestError(field_name, str(UnknownCharactersError(unknown)), chars=unknown)


def _validate_logprobs(field_name: str, value: int | None) -> None:
    if value is not None and not (_is_int(value) and 0 <= value <= MAX_LOGPROBS):
        raise RequestError(field_name, f"must be a whole number between 0 and {MAX_LOGPROBS}, got {value}")


def validate(request: GenerationRequest, vocab: Vocab, limits: EngineLimits) -> None:
    """Refuse a request with an error naming the field and the limit."""
    validate_text("seed", request.seed, vocab, limits.max_seed_chars)
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
    _validate_logprobs("logprobs", request.logprobs)


def validate_score(request: ScoreRequest, vocab: Vocab, limits: EngineLimits) -> None:
    """A text of at least two characters (the first is context for the second) within the limit."""
    validate_text("text", request.text, vocab, limits.max_score_chars, min_chars=2)
    _validate_logprobs("top_k", request.top_k)
    if request.timeout is not None and not request.timeout > 0:
        raise RequestError("timeout", f"must be > 0 seconds, got {request.timeout}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


R = TypeVar("R")


class Handle(Generic[R]):
    """A submitted job as its caller sees it: wait for the outcome, or cancel.

    Usable from threads (`handle.result()`) and from asyncio (`await handle.wait()`); the worker thread
    finishes it, and consumers never block the worker.
    """

    def __init__(
        self,
        timeout: float | None,
        loop: asyncio.AbstractEventLoop | None,
        withdraw: Callable[[Handle[Any]], None] | None = None,
    ):
        self.submitted = time.perf_counter()
        self.deadline = self.submitted + timeout if timeout else None
        self.finished_at: float | None = None
        self._result: R | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._cond = threading.Condition()
        self._cancelled = False
        self._loop = loop
        self._async_event = asyncio.Event() if loop else None
        self._wake_pending = False  # a wakeup is scheduled on the consumer's loop and not yet seen
        self._withdraw = withdraw  # takes a cancelled request out of the waiting queue at once
        self._on_finish: Callable[[], None] | None = None  # the engine counts what is still unfinished

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

    def _finish(self, result: R | None, error: BaseException | None = None) -> None:
        if self._done.is_set():  # a job ends once
            return
        self._result, self._error = result, error
        self.finished_at = time.perf_counter()
        self._done.set()
        if self._on_finish is not None:
            self._on_finish()
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
        """'cancelled' or 'timeout' once the request must stop before its end, else None."""
        if self._cancelled:
            return "cancelled"
        if self.deadline and time.perf_counter() > self.deadline:
            return "timeout"
        return None

    def done(self) -> bool:
        return self._done.is_set()

    def _outcome(self) -> R:
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def result(self, timeout: float | None = None) -> R:
        if not self._done.wait(timeout):
            raise TimeoutError("the request did not finish in time")
        return self._outcome()

    async def wait(self) -> R:
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


class Generation(Handle[GenerationResult]):
    """A handle on one generation request: iterate characters, wait for the result, or cancel.

    Usable from threads (`for ch in gen`, `gen.result()`) and from asyncio (`async for`, `await
    gen.wait()`); the worker thread pushes events, consumers never block the worker.
    """

    def __init__(
        self,
        request: GenerationRequest,
        random_seed: int,
        loop: asyncio.AbstractEventLoop | None,
        withdraw: Callable[[Handle[Any]], None] | None = None,
    ):
        super().__init__(request.timeout, loop, withdraw)
        self.request = request
        self.random_seed = random_seed
        self.first_char_at: float | None = None
        self._chunks: collections.deque[str] = collections.deque()
        # With `request.logprobs`: one CharLogprob per character handed out so far, in order; each is
        # added before its character, so a consumer that has read n characters finds n entries here.
        self.logprobs: list[CharLogprob] = []
        self._streaming = False  # an `async for` consumer has started: wake its loop for chunks

    # --- producer side (worker thread) ---
    def _emit(self, text: str, logprobs: Sequence[CharLogprob] = ()) -> None:
        if text:
            if self.first_char_at is None:
                self.first_char_at = time.perf_counter()
            if logprobs:
                self.logprobs.extend(logprobs)
            self._chunks.append(text)
            # Waking an event loop costs a syscall and a task switch: only for `async for` consumers.
            self._notify(wake_loop=self._streaming)

    # --- consumer side ---
    def __iter__(self) -> Iterator[str]:
        while True:
            with self._cond:
                while not self._chunks and not self._done.is_set():
                    self._cond.wait()
            while self._chunks:
                yield self._chunks.popleft()
            if self._done.is_set() and not self._chunks:
                return

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


class Scoring(Handle[ScoreResult]):
    """A handle on one scoring job: wait for its ScoreResult (or ScoringStopped), or cancel it."""

    def __init__(
        self,
        request: ScoreRequest,
        loop: asyncio.AbstractEventLoop | None,
        withdraw: Callable[[Handle[Any]], None] | None = None,
    ):
        super().__init__(request.timeout, loop, withdraw)
        self.request = request


@dataclass(eq=False)  # identity: jobs are found in the queue by object, never compared by tensors
class _Prefill:
    """A request whose seed is being run through the LSTM, chunk by chunk."""

    gen: Generation
    ids: torch.Tensor
    pos: int = 0
    state: tuple[torch.Tensor, torch.Tensor] | None = None
    seconds: float = 0.0
    admitted: float = field(default_factory=time.perf_counter)
    # Requests with the same long seed admitted while this one prefills (the n choices of one prompt):
    # they take its final state instead of computing the same chunks again.
    followers: list[_Prefill] = field(default_factory=list)

    @property
    def handles(self) -> list[Handle[Any]]:
        return [self.gen, *(f.gen for f in self.followers)]


@dataclass(eq=False)
class _ScoreJob:
    """A text being scored, chunk by chunk, with what its chunks found so far."""

    scoring: Scoring
    ids: torch.Tensor  # (1, characters)
    pos: int = 0  # characters fed to the model; each predicts the next one
    state: tuple[torch.Tensor, torch.Tensor] | None = None
    seconds: float = 0.0
    admitted: float = field(default_factory=time.perf_counter)
    per_char: list[CharLogprob] = field(default_factory=list)

    @property
    def handles(self) -> list[Handle[Any]]:
        return [self.scoring]


_Job = _Prefill | _ScoreJob


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
    logprobs: list[CharLogprob] | None = None  # one per generated character, when the request asked
    pending: CharLogprob | None = None  # the entry of the character just sampled, before _advance takes it
    # The request's sampling settings as the samplers take them, worked out once instead of every step.
    scale: float = 1.0
    top_k: int = 0
    top_p: float = 0.0


class Engine:
    """Continuous-batching text generation (and scoring) over one model, on CPU or CUDA."""

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
        self._waiting: collections.deque[Handle[Any]] = collections.deque()
        self._rows: list[_Row] = []
        self._asking = 0  # rows of self._rows that want logprobs: while 0, a step computes none
        self._prefilling: collections.deque[_Job] = collections.deque()
        self._lock = threading.Condition()
        self._accepting = True
        self._unfinished = 0  # jobs submitted and not yet finished, wherever they are
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
        return self.submit_many([request])[0]

    def submit_many(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Validate all, then enqueue all or none. Requests queued together are admitted together
        while rows are free, so those with the same seed (the n choices of one prompt) share its prefill."""
        for request in requests:
            validate(request, self.vocab, self.limits)
        loop = _running_loop()
        gens = [
            Generation(r, r.random_seed if r.random_seed is not None else new_random_seed(), loop, self._withdraw)
            for r in requests
        ]
        self._enqueue(gens)
        return gens

    def score(self, request: ScoreRequest) -> Scoring:
        """Validate and enqueue a scoring job; raises RequestError, QueueFullError or EngineClosedError at once."""
        validate_score(request, self.vocab, self.limits)
        scoring = Scoring(request, _running_loop(), self._withdraw)
        self._enqueue([scoring])
        return scoring

    def generate(self, request: GenerationRequest, timeout: float | None = None) -> GenerationResult:
        """Submit and wait: the synchronous convenience for scripts and the CLI."""
        return self.submit(request).result(timeout)

    def _enqueue(self, handles: Sequence[Handle[Any]]) -> None:
        with self._lock:
            if not self._accepting:
                raise EngineClosedError("the engine is shutting down and accepts no new requests")
            if len(self._waiting) + len(handles) > self.limits.max_queue:
                wanted = f"; this request needs {len(handles)} places" if len(handles) > 1 else ""
                raise QueueFullError(f"queue is full ({self.limits.max_queue} waiting requests{wanted})")
            for handle in handles:
                handle._on_finish = self._finished_one
            self._unfinished += len(handles)
            self._waiting.extend(handles)
            self._lock.notify()

    def _finished_one(self) -> None:
        with self._lock:
            self._unfinished -= 1

    def _withdraw(self, handle: Handle[Any]) -> None:
        """Take a cancelled request out of the waiting queue and finish it; if the worker has it
        already, the worker sees the cancellation at its next look."""
        with self._lock:
            try:
                self._waiting.remove(handle)
            except ValueError:
                return
        self._finish_unstarted(handle, time.perf_counter(), "cancelled")

    def close(self, grace: float = 10.0) -> None:
        """Stop admitting; let in-flight work finish for up to `grace` seconds, then end what is
        left with EngineClosedError and stop. Safe to call again (later calls return once stopped)."""
        with self._lock:
            self._accepting = False
            self._lock.notify()
        end = time.monotonic() + grace
        # Counted from submission to finish: a job between the queue and its row is in flight too.
        while self._unfinished and time.monotonic() < end and self._thread.is_alive():
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
        unfinished: list[Handle[Any]] = [row.gen for row in self._rows]
        unfinished += [handle for job in self._prefilling for handle in job.handles]
        with self._lock:
            unfinished += self._waiting
            self._waiting.clear()
        for handle in unfinished:
            self._count("cancelled")
            handle._finish(None, EngineClosedError("the engine shut down before this request finished"))
        self._rows.clear()
        self._asking = 0
        self._prefilling.clear()

    def _admit(self) -> None:
        """Move waiting requests into prefill while rows are free, then prefill.

        Short seeds (up to SHORT_SEED characters) admitted together are prefilled together, through
        the decoder's own steps: 64 simultaneous requests get their first characters after one
        shared pass instead of 64 passes one after another. Longer seeds, and texts to score, go
        through nn.LSTM in fixed chunks of PREFILL_CHUNK characters, a budget's worth per loop
        iteration, so a huge seed or text is interleaved with decode steps instead of stalling them.
        Which path a seed takes and where its chunks end depend only on the seed, so its text never
        depends on others.
        """
        while short := self._take_waiting():  # requests that came in meanwhile go next, not after a step
            self._prefill_short(short)
        budget = PREFILL_CHUNK
        while self._prefilling and budget > 0:
            job = self._prefilling[0]
            if self._drop_ended(job):
                continue
            try:
                budget -= self._score_chunk(job) if isinstance(job, _ScoreJob) else self._prefill_chunk(job)
            except Exception as exc:  # one bad request must not stop the worker
                if job in self._prefilling:  # it may already have left the queue when it failed
                    self._prefilling.remove(job)
                what = "scoring" if isinstance(job, _ScoreJob) else "prefill"
                self._fail(job.handles, f"{what} failed: {exc}")

    def _drop_ended(self, job: _Job) -> bool:
        """Finish the requests of `job` that were cancelled or ran out of time; True when none is left
        (the job has then left the queue)."""
        if isinstance(job, _ScoreJob):
            if reason := job.scoring.ended_early():
                self._prefilling.popleft()
                self._finish_unstarted(job.scoring, job.admitted, reason)
                return True
            return False
        for follower in list(job.followers):
            if reason := follower.gen.ended_early():
                job.followers.remove(follower)
                self._finish_unstarted(follower.gen, follower.admitted, reason)
        if reason := job.gen.ended_early():
            self._finish_unstarted(job.gen, job.admitted, reason)
            if not job.followers:
                self._prefilling.popleft()
                return True
            heir = job.followers.pop(0)  # takes over the work done so far: the same seed, the same state
            job.gen, job.admitted = heir.gen, heir.admitted
        return False

    def _slots_taken(self, short: list[_Prefill]) -> int:
        """Rows in use or promised: active rows, short seeds being admitted, and every queued job's
        requests (a scoring job holds no decoder row but counts, so max_batch bounds all the work)."""
        queued = sum(1 + len(job.followers) if isinstance(job, _Prefill) else 1 for job in self._prefilling)
        return len(self._rows) + len(short) + queued

    def _take_waiting(self) -> list[_Prefill]:
        """Admit waiting requests while rows are free; return the short-seed ones, queue the rest."""
        short: list[_Prefill] = []
        while self._slots_taken(short) < self.limits.max_batch:
            with self._lock:
                if not self._waiting:
                    break
                handle = self._waiting.popleft()
            if reason := handle.ended_early():
                self._finish_unstarted(handle, time.perf_counter(), reason)
                continue
            if isinstance(handle, Scoring):
                self._prefilling.append(_ScoreJob(handle, self.vocab.encode(handle.request.text).to(self.device)[None]))
                continue
            assert isinstance(handle, Generation)
            seed = handle.request.seed
            job = _Prefill(handle, self.vocab.encode(seed).to(self.device)[None])
            if self._decoder.row_invariant and job.ids.size(1) <= SHORT_SEED:
                short.append(job)
            elif leader := self._prefilling_seed(seed):
                leader.followers.append(job)
            else:
                self._prefilling.append(job)
        return short

    def _prefilling_seed(self, seed: str) -> _Prefill | None:
        """The long-seed job already running this seed, if any."""
        for job in self._prefilling:
            if isinstance(job, _Prefill) and job.gen.request.seed == seed:
                return job
        return None

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
        """Run the next chunk of a seed through nn.LSTM; at its end, sample the first character of
        the job's request and of each follower."""
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
        jobs = [job, *job.followers]
        for follower in job.followers:
            follower.seconds = job.seconds
        last = logits[:, -1].expand(len(jobs), -1)
        self._start_rows(jobs, last, lambda _, slot: self._decoder.load_row(slot, h, c))
        return chunk.size(1)

    def _score_chunk(self, job: _ScoreJob) -> int:
        """Run the next chunk of a text through nn.LSTM and score the characters it predicts; at the
        end of the text, finish the job. Each position's logits predict the next character, so the
        chunks feed every character but the last."""
        predicted = job.ids.size(1) - 1
        chunk = job.ids[:, job.pos : min(job.pos + PREFILL_CHUNK, predicted)]
        started = time.perf_counter()
        logits, job.state, _ = self.model(chunk, job.state)
        n = chunk.size(1)
        targets = job.ids[0, job.pos + 1 : job.pos + 1 + n].tolist()
        logp = logits[0].double().log_softmax(-1)
        if job.pos == 0:
            job.per_char.append(CharLogprob(self.vocab.chars[int(job.ids[0, 0])], None))
        job.per_char += _char_logprobs(logp, targets, [job.scoring.request.top_k] * n, self.vocab.chars)
        job.pos += n
        job.seconds += time.perf_counter() - started
        if job.pos < predicted:
            self._prefilling.rotate(-1)  # round robin with long seeds and other texts
            return n
        self._prefilling.popleft()
        total = math.fsum(entry.logprob for entry in job.per_char[1:] if entry.logprob is not None)
        scoring = job.scoring
        self._count("scored")
        scoring._finish(
            ScoreResult(
                text=scoring.request.text,
                chars=predicted,
                logprob=total,
                bits_per_char=-total / predicted / math.log(2),
                per_char=job.per_char,
                queue_ms=round((job.admitted - scoring.submitted) * 1e3, 3),
                score_ms=round(job.seconds * 1e3, 3),
            )
        )
        return n

    def _start_rows(self, jobs: list[_Prefill], logits: torch.Tensor, place: Callable[[int, int], None]) -> None:
        """Sample each prefilled job's first character; give the unfinished ones a decode row.

        `place(i, slot)` puts job i's LSTM state into decoder row `slot`.
        """
        rows = []
        for job in jobs:
            req = job.gen.request
            params = req.sampling
            rows.append(_Row(job.gen, RowSampler(params, job.gen.random_seed), 0, admitted=job.admitted,
                             logprobs=[] if req.logprobs is not None else None, scale=params.sampler_scale,
                             top_k=params.top_k_for(self._vocab_size), top_p=params.top_p_or_off))
        sampling = time.perf_counter()
        tokens = self._sample(rows, logits).tolist()
        self._attach_logprobs(rows, logits, tokens)
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
            self._asking += row.logprobs is not None

    def _fail(self, handles: Sequence[Handle[Any]], message: str) -> None:
        for handle in handles:
            self._count("failed")
            handle._finish(None, GenerationFailed(message))

    def _count(self, outcome: str) -> None:
        with self._stats_lock:
            setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)

    def _finish_unstarted(self, handle: Handle[Any], admitted: float, reason: FinishReason) -> None:
        """End a request that never reached a decode row (cancelled, timed out, or shut down)."""
        if isinstance(handle, Generation):
            logprobs: list[CharLogprob] | None = [] if handle.request.logprobs is not None else None
            self._finish(_Row(handle, RowSampler(SamplingParams(), 0), 0, admitted=admitted, logprobs=logprobs),
                         reason)
            return
        self._count({"cancelled": "cancelled", "timeout": "timeouts"}.get(reason, "failed"))
        handle._finish(None, ScoringStopped("timeout" if reason == "timeout" else "cancelled"))

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """One id per row, each drawn with that row's settings and its own random stream."""
        scale = [r.scale for r in rows]
        top_k = [r.top_k for r in rows]
        top_p = [r.top_p for r in rows]
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

    def _attach_logprobs(self, rows: list[_Row], logits: torch.Tensor, tokens: list[int]) -> None:
        """Give each row that asked for log-probabilities the entry of the character it just sampled.
        Rows that did not ask cost one look each: no softmax, no sort, no copy."""
        asking = [i for i, row in enumerate(rows) if row.logprobs is not None]
        if not asking:
            return
        index = torch.tensor(asking, device=logits.device)
        logp = logits.index_select(0, index).double().log_softmax(-1)  # a copy: the native buffer is reused
        tops = [rows[i].gen.request.logprobs or 0 for i in asking]
        entries = _char_logprobs(logp, [tokens[i] for i in asking], tops, self.vocab.chars)
        for i, entry in zip(asking, entries):
            rows[i].pending = entry

    def _step(self) -> None:
        n = len(self._rows)
        self.stats.steps += 1
        self.stats.batch_rows += n
        try:
            logits = self._decoder.step(n)
            ids = self._sample(self._rows, logits)
            self._decoder.tokens[:n].copy_(ids)
            tokens = ids.tolist()
            if self._asking:
                self._attach_logprobs(self._rows, logits, tokens)
        except Exception as exc:  # a failure of the batched step: fail these rows, keep the worker
            self._fail([row.gen for row in self._rows], f"decode step failed: {exc}")
            self._rows.clear()
            self._asking = 0
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
        self._asking -= self._rows[i].logprobs is not None
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
        if row.logprobs is not None:
            assert row.pending is not None, "a row that asks for logprobs got no entry for its character"
            row.logprobs.append(row.pending)
            row.pending = None
        text = "".join(row.generated[-self.limits.max_stop_chars :]) if req.stop else ""
        for s in req.stop:
            if text.endswith(s):
                del row.generated[len(row.generated) - len(s) :]
                if row.logprobs is not None:
                    del row.logprobs[len(row.generated) :]
                return self._finish(row, "stop")
        if len(row.generated) >= req.length:
            return self._finish(row, "length")
        held = _held_back(text, req.stop)
        upto = len(row.generated) - held
        if upto > row.emitted:
            if row.logprobs is None:  # the common case, inline: this runs for every character
                gen._emit("".join(row.generated[row.emitted : upto]))
                row.emitted = upto
            else:
                self._emit(row, upto)
        return False

    def _emit(self, row: _Row, upto: int) -> None:
        """Hand the row's characters up to `upto` (and their log-probabilities) to its request."""
        entries = row.logprobs[row.emitted : upto] if row.logprobs is not None else ()
        row.gen._emit("".join(row.generated[row.emitted : upto]), entries)
        row.emitted = upto

    def _finish(self, row: _Row, reason: FinishReason) -> bool:
        gen = row.gen
        self._emit(row, len(row.generated))
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
                logprobs=row.logprobs,
            )
        )
        return True


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The caller's event loop, to wake it from the worker; None for a caller outside asyncio."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _char_logprobs(logp: torch.Tensor, chosen: list[int], tops: list[int], chars: tuple[str, ...]) -> list[CharLogprob]:
    """Row r of `logp` (rows, vocab; log-probabilities) as the CharLogprob of character chosen[r], with
    its tops[r] most likely alternatives (a stable sort: ties go to the lowest id, as in sampling)."""
    picked = logp.gather(1, torch.tensor(chosen, device=logp.device)[:, None])[:, 0].tolist()
    k = max(tops, default=0)
    if not k:
        return [CharLogprob(chars[c], lp) for c, lp in zip(chosen, picked)]
    values, ids = logp.sort(dim=1, descending=True, stable=True)
    top_values, top_ids = values[:, :k].tolist(), ids[:, :k].tolist()
    return [
        CharLogprob(chars[c], lp, tuple((chars[t], v) for t, v in zip(t_ids[:kr], t_vals[:kr])))
        for c, lp, kr, t_ids, t_vals in zip(chosen, picked, tops, top_ids, top_values)
    ]


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters might begin a stop string, and so must not be streamed yet."""
    held = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:n]):
                held = n
                break
    return held
