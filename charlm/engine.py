"""The generation engine: a worker thread owns the model and decodes all its requests together.

The thread is a scheduler's (charlm/scheduler.py), shared by the engines of every loaded model and
taking turns between them; an engine made without one gets a scheduler of its own.

Each step the worker admits waiting requests (prefilling their seeds), runs one batched LSTM step
for every active row, samples each row from its own random stream, hands each character to its
request, and retires rows that are finished, cancelled or out of time. Requests join between
steps (continuous batching), so nobody waits for another request to end.

Scoring a text (how likely the model finds each of its characters) is a job of its own in the same
worker: it goes through nn.LSTM in the same chunks as a long seed, interleaved with decode steps.

What goes in and comes out (requests, results, errors) is in charlm/request.py; what a caller holds
while the work runs (handles) in charlm/handles.py; stop strings in charlm/stopping.py; the worker's
records of jobs and rows in charlm/jobs.py.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from charlm import native
from charlm.choice import choice_logprobs, draw_choice
from charlm.decoder import Decoder
from charlm.handles import Generation, Handle, Scoring, running_loop
from charlm.jobs import PREFILL_CHUNK, Job, Prefill, Row, ScoreJob, chunk_end
from charlm.logprobs import sampled_logprobs, scored_logprobs
from charlm.model import CharLSTM
from charlm.native import WeightFormat
from charlm.prefix_cache import PrefixCache, PrefixStates
from charlm.request import (
    CharLogprob,
    EngineClosedError,
    EngineLimits,
    FinishReason,
    GenerationFailed,
    GenerationRequest,
    GenerationResult,
    QueueFullError,
    ScoreRequest,
    ScoreResult,
    ScoringStopped,
    Timings,
    validate,
    validate_score,
)
from charlm.sampling import RowSampler, SamplingParams, new_random_seed, sample_batch
from charlm.scheduler import Scheduler
from charlm.steering import Steering, constrain
from charlm.stopping import StopStrings
from charlm.vocab import Vocab

__all__ = ["Engine", "EngineHooks", "EngineStats"]


# Seeds up to this many characters are prefilled together, through the decoder's batched steps.
SHORT_SEED = 64

# Choice scores kept for requests that draw from the same choices after the same seed (charlm/choice.py).
CHOICE_SCORES_KEPT = 16


@dataclass(frozen=True)
class EngineHooks:
    """Seams for tests and diagnostics to act inside the worker (pace it, inject a fault) without
    patching its private methods. Each runs on the worker thread, so one that blocks holds up every
    request; None (the default) costs one comparison per step or character.
    """

    # Before each batched decode step. Raising fails that step's requests, as a failed step would.
    before_step: Callable[[], object] | None = None
    # Each character sampled for a generation, before the engine records it: (its request, how many
    # characters that request had generated before it). Raising fails that request alone.
    on_char: Callable[[Generation, int], object] | None = None


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


def _draw(request: GenerationRequest) -> tuple[Any, ...] | None:
    """What a request's choice draw depends on besides its seed (None: it draws none)."""
    constraint = request.constraint
    if constraint is None or constraint.choices is None:
        return None
    return constraint.constraint, request.sampling.logit_bias, request.sampling.sampler_scale


class Engine:
    """Continuous-batching text generation (and scoring) over one model, on CPU or CUDA."""

    def __init__(self, model: CharLSTM, vocab: Vocab, limits: EngineLimits | None = None, use_native: bool = True,
                 hooks: EngineHooks | None = None, scheduler: Scheduler | None = None,
                 cache: PrefixCache | None = None, version: str = "", weights: WeightFormat = "fp32"):
        """`use_native=False` runs on PyTorch alone even where the native kernels are built; `hooks`
        act inside the worker (see EngineHooks); `scheduler` is the worker shared with other models'
        engines (charlm/scheduler.py), else the engine gets one of its own; `cache` keeps states after
        long prefixes under `version`, which must name these weights and no others; `weights` is the
        format decode steps read them in (charlm/native.py; raises native.WeightsError when they cannot
        be held in it). Long seeds and scored texts run nn.LSTM in fp32 whatever the format."""
        self.model = model.eval()
        self.vocab = vocab
        self.limits = limits or EngineLimits()
        self.hooks = hooks or EngineHooks()
        self._on_char = self.hooks.on_char  # read for every character: one attribute, not two
        self.device = model.fc.weight.device
        kernels = native.load() if use_native and self.device.type == "cpu" else None
        self._decoder = Decoder(model, self.limits.max_batch, kernels, weights)
        self._sampled = torch.zeros(self.limits.max_batch, dtype=torch.long)  # the native sampler's output
        self._vocab_size = len(vocab)
        self._waiting: collections.deque[Handle[Any]] = collections.deque()
        self._rows: list[Row] = []
        self._asking = 0  # rows of self._rows that want logprobs: while 0, a step computes none
        self._prefilling: collections.deque[Job] = collections.deque()
        self._lock = threading.Lock()
        self._accepting = True
        self._unfinished = 0  # jobs submitted and not yet finished, wherever they are
        self.stats = EngineStats()
        self._stats_lock = threading.Lock()  # finish counters are also written by withdrawing consumers
        self._choice_scores: collections.OrderedDict[tuple[Any, ...], torch.Tensor] = collections.OrderedDict()
        self._prefixes = PrefixStates(cache, f"{version}/{weights}")  # a format's short prefills differ
        self._owns_scheduler = scheduler is None
        self._scheduler = scheduler or Scheduler()
        self._scheduler.add(self)
        self._closed = False

    # --- public API ---
    @property
    def native(self) -> bool:
        """Whether decoding runs in the compiled kernels (else PyTorch alone, several times slower)."""
        return self._decoder.kernels is not None

    @property
    def weights(self) -> WeightFormat:
        """The format decode steps read the weights in."""
        return self._decoder.weights

    @property
    def unfinished(self) -> int:
        """Requests submitted and not yet finished, queued or running: 0 means the engine is idle."""
        return self._unfinished

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
        loop = running_loop()
        gens = [
            Generation(r, r.random_seed if r.random_seed is not None else new_random_seed(), loop, self._withdraw)
            for r in requests
        ]
        self._enqueue(gens)
        return gens

    def score(self, request: ScoreRequest) -> Scoring:
        """Validate and enqueue a scoring job; raises RequestError, QueueFullError or EngineClosedError at once."""
        validate_score(request, self.vocab, self.limits)
        scoring = Scoring(request, running_loop(), self._withdraw)
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
        self._scheduler.wake()  # after the lock: the scheduler takes its own, then ours

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
        end = time.monotonic() + grace
        # Counted from submission to finish: a job between the queue and its row is in flight too.
        while self._unfinished and time.monotonic() < end and self._scheduler.alive:
            time.sleep(0.01)
        self._scheduler.remove(self, timeout=max(grace, 1.0))
        if self._owns_scheduler:
            self._scheduler.close()
        self._closed = True

    @property
    def closed(self) -> bool:
        """Closed and out of its scheduler: nothing of it runs any more."""
        return self._closed

    def has_work(self) -> bool:
        return bool(self._rows or self._waiting or self._prefilling)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- worker (called by the scheduler, on its thread) ---
    def run_once(self) -> None:
        """One iteration: admit and prefill a budget of waiting work, then one decode step."""
        self._admit()
        if self._rows:
            self._step()

    def end_all(self, error: BaseException) -> None:
        """Finish every request still held, queued or running, with `error` (shutdown, or a failure
        of the engine itself)."""
        unfinished: list[Handle[Any]] = [row.gen for row in self._rows]
        unfinished += [handle for job in self._prefilling for handle in job.handles]
        with self._lock:
            unfinished += self._waiting
            self._waiting.clear()
        for handle in unfinished:
            self._count("cancelled" if isinstance(error, EngineClosedError) else "failed")
            handle._finish(None, error)
        self._rows.clear()
        self._asking = 0
        self._prefilling.clear()

    def _admit(self) -> None:
        """Move waiting requests into prefill while rows are free, then prefill.

        Short seeds (up to SHORT_SEED characters) admitted together are prefilled together, through
        the decoder's own steps: 64 simultaneous requests get their first characters after one
        shared pass instead of 64 passes one after another. Longer seeds, and texts to score, go
        through nn.LSTM in chunks of PREFILL_CHUNK characters (the rest in power-of-two pieces,
        chunk_end), a budget's worth per loop iteration, so a huge seed or text is interleaved with
        decode steps instead of stalling them. So do the seeds of requests that draw a `choice`: the
        choices are scored when the seed ends, and their characters count against the budget.
        Which path a seed takes and where its chunks end depend only on the request, so its text
        never depends on others.
        """
        while short := self._take_waiting():  # requests that came in meanwhile go next, not after a step
            self._prefill_short(short)
        budget = PREFILL_CHUNK
        while self._prefilling and budget > 0:
            job = self._prefilling[0]
            if self._drop_ended(job):
                continue
            try:
                budget -= self._score_chunk(job) if isinstance(job, ScoreJob) else self._prefill_chunk(job)
            except Exception as exc:  # one bad request must not stop the worker
                if job in self._prefilling:  # it may already have left the queue when it failed
                    self._prefilling.remove(job)
                what = "scoring" if isinstance(job, ScoreJob) else "prefill"
                self._fail(job.handles, f"{what} failed: {exc}")

    def _drop_ended(self, job: Job) -> bool:
        """Finish the requests of `job` that were cancelled or ran out of time; True when none is left
        (the job has then left the queue)."""
        if isinstance(job, ScoreJob):
            if reason := job.scoring.ended_early():
                self._prefilling.popleft()
                self._finish_unstarted(job.scoring, job.admitted, reason, started=job.pos > 0)
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

    def _slots_taken(self, short: list[Prefill]) -> int:
        """Rows in use or promised: active rows, short seeds being admitted, and every queued job's
        requests (a scoring job holds no decoder row but counts, so max_batch bounds all the work)."""
        queued = sum(1 + len(job.followers) if isinstance(job, Prefill) else 1 for job in self._prefilling)
        return len(self._rows) + len(short) + queued

    def _take_waiting(self) -> list[Prefill]:
        """Admit waiting requests while rows are free; return the short-seed ones, queue the rest."""
        short: list[Prefill] = []
        while self._slots_taken(short) < self.limits.max_batch:
            with self._lock:
                if not self._waiting:
                    break
                handle = self._waiting.popleft()
            if reason := handle.ended_early():
                self._finish_unstarted(handle, time.perf_counter(), reason)
                continue
            if isinstance(handle, Scoring):
                score_job = ScoreJob(self._encode(handle.request.text), scoring=handle)
                self._prefixes.resume_scoring(score_job, handle.request.text, handle.request.top_k)
                self._prefilling.append(score_job)
                continue
            assert isinstance(handle, Generation)
            seed = handle.request.seed
            job = Prefill(self._encode(seed), gen=handle)
            if self._decoder.row_invariant and job.ids.size(1) <= SHORT_SEED and _draw(handle.request) is None:
                short.append(job)
            elif leader := self._prefilling_seed(handle.request):
                leader.followers.append(job)
            else:
                self._prefixes.resume_prefill(job, seed)
                self._prefilling.append(job)
        return short

    def _encode(self, text: str) -> torch.Tensor:
        """`text` as a batch of one row of ids on the model's device, as nn.LSTM takes it."""
        return self.vocab.encode(text).to(self.device)[None]

    def _prefilling_seed(self, request: GenerationRequest) -> Prefill | None:
        """The long-seed job already running this request's seed, if any. One that draws a choice
        follows only a job that draws from the same choices with the same settings: it shares that
        job's scoring, and adds no scoring work of its own to the loop turn the job ends in."""
        for job in self._prefilling:
            if (isinstance(job, Prefill) and job.gen.request.seed == request.seed
                    and _draw(job.gen.request) == _draw(request)):
                return job
        return None

    def _prefill_short(self, jobs: list[Prefill]) -> None:
        """Prefill short seeds together in the free decoder rows after the active ones.

        Requests with the same seed (n samples of one prompt) share one prefilled row: its state
        is what each of them would have computed alone, bit for bit.
        """
        by_seed: dict[str, list[Prefill]] = {}
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
            self._start_rows(ordered, logits[which], lambda i: (h[:, which[i]], c[:, which[i]]))
        except Exception as exc:  # before any of them got a row: these requests fail, nothing else
            self._fail([job.gen for job in jobs], f"prefill failed: {exc}")

    def _prefill_chunk(self, job: Prefill) -> int:
        """Run the next chunk of a seed through nn.LSTM (keeping the state at its end in the prefix
        cache); at the seed's end, sample the first character of the job's request and of each follower."""
        seed_chars = job.ids.size(1)
        if job.end_logits is not None:  # the whole seed came from the cache
            self._prefilling.popleft()
            return 1 + self._start_prefilled(job, job.end_logits[None])
        chunk = job.ids[:, job.pos : chunk_end(job.pos, seed_chars)]
        started = time.perf_counter()
        logits, job.state, _ = self.model(chunk, job.state)
        job.pos += chunk.size(1)
        job.seconds += time.perf_counter() - started
        if job.pos < seed_chars:
            self._prefixes.keep(job, "state", job.pos)
            self._prefilling.rotate(-1)  # round robin: a long seed does not hold up short ones
            return chunk.size(1)
        self._prefilling.popleft()
        last = logits[0, -1:]
        self._prefixes.keep(job, "end", seed_chars, logits=last[0].clone())
        return chunk.size(1) + self._start_prefilled(job, last)

    def _start_prefilled(self, job: Prefill, last: torch.Tensor) -> int:
        """Sample the first character of a prefilled job's request and of each follower from `last`
        (1, vocab), and give them rows with the job's final state; return the characters the choices
        drawn took to score (a prefill budget's worth of work, counted as such)."""
        assert job.state is not None
        h, c = job.state[0][:, 0], job.state[1][:, 0]
        jobs = [job, *job.followers]
        for follower in job.followers:
            follower.seconds = job.seconds
        return self._start_rows(jobs, last.expand(len(jobs), -1), lambda _: (h, c))

    def _score_chunk(self, job: ScoreJob) -> int:
        """Run the next chunk of a text through nn.LSTM and score the characters it predicts; at the
        end of the text, finish the job. Each position's logits predict the next character, so the
        chunks feed every character but the last."""
        predicted = job.ids.size(1) - 1
        chunk = job.ids[:, job.pos : chunk_end(job.pos, predicted)]
        started = time.perf_counter()
        logits, job.state, _ = self.model(chunk, job.state)
        n = chunk.size(1)
        targets = job.ids[0, job.pos + 1 : job.pos + 1 + n].tolist()
        if job.pos == 0:
            job.per_char.append(CharLogprob(self.vocab.chars[int(job.ids[0, 0])], None))
        top_k = job.scoring.request.top_k
        job.per_char += scored_logprobs(logits[0], targets, top_k, self.vocab.chars)
        job.pos += n
        job.seconds += time.perf_counter() - started
        if n == PREFILL_CHUNK and job.pos % PREFILL_CHUNK == 0:  # a whole chunk, where a prefill's ends too
            self._prefixes.keep(job, "state", job.pos)
            self._prefixes.keep(job, "scores", job.pos + 1, scores=tuple(job.per_char[-n:]), top_k=top_k)
        if job.pos < predicted:
            self._prefilling.rotate(-1)  # round robin with long seeds and other texts
            return n
        self._prefilling.popleft()
        scoring = job.scoring
        self._count("scored")
        queue_s = job.admitted - scoring.submitted
        scoring._finish(ScoreResult.from_per_char(scoring.request.text, job.per_char, queue_s, job.seconds))
        return n

    def _start_rows(self, jobs: list[Prefill], logits: torch.Tensor,
                    state_of: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Sample each prefilled job's first character; give the unfinished ones a decode row. Return
        the characters scored to draw choices.

        `state_of(i)` is job i's LSTM state after its seed (h, c: layers x hidden each).
        """
        rows = []
        for job in jobs:
            req = job.gen.request
            params = req.sampling
            rows.append(Row(job.gen, RowSampler(params, job.gen.random_seed), 0, admitted=job.admitted,
                             logprobs=[] if req.logprobs is not None else None, scale=params.sampler_scale,
                             top_k=params.top_k_for(self._vocab_size), top_p=params.top_p_or_off,
                             stops=StopStrings(req.stop) if req.stop else None,
                             min_p=0.0 if params.greedy else params.min_p, constraint=req.constraint,
                             steering=Steering(params, self._vocab_size, job.ids[0]) if params.steers else None))
        sampling = time.perf_counter()
        scored, failed = self._draw_choices(rows, logits, state_of)
        tokens = self._sample(rows, logits).tolist()
        self._attach_logprobs(rows, logits, tokens)
        for i, (job, row, token) in enumerate(zip(jobs, rows, tokens)):
            if i in failed:
                continue
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
            self._decoder.load_row(slot, *state_of(i))
            self._decoder.tokens[slot] = token
            self._rows.append(row)
            self._asking += row.logprobs is not None
        return scored

    def _draw_choices(self, rows: list[Row], logits: torch.Tensor,
                      state_of: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> tuple[int, set[int]]:
        """Hold each row with a `choice` to one of them, drawn whole (charlm/choice.py) with a uniform
        of its own stream; return the characters scored, and the rows whose scoring failed (their
        requests have failed, alone). Scores are kept for the last few (seed, choices, bias, scale):
        a seed's state is the same bits whoever sends it, so the n samples of a prompt, or a prompt
        sent again, score once."""
        chars, failed = 0, set()
        for i, row in enumerate(rows):
            constraint = row.constraint
            if constraint is None or constraint.choices is None:
                continue
            params = row.sampler.params
            key = (row.gen.request.seed, _draw(row.gen.request))
            if (scores := self._choice_scores.get(key)) is None:
                bias = row.steering.bias if row.steering is not None else None
                try:
                    scores = choice_logprobs(self.model, state_of(i), logits[i], constraint, bias, row.scale)
                except Exception as exc:
                    self._fail([row.gen], f"scoring the choices failed: {exc}")
                    failed.add(i)
                    continue
                chars += sum(map(len, constraint.choices))
                self._choice_scores[key] = scores
                if len(self._choice_scores) > CHOICE_SCORES_KEPT:
                    self._choice_scores.popitem(last=False)
            self._choice_scores.move_to_end(key)
            most_likely = params.greedy or row.top_k == 1
            row.constraint = constraint.only(draw_choice(scores, most_likely, row.sampler.uniform()))
        return chars, failed

    def _fail(self, handles: Sequence[Handle[Any]], message: str) -> None:
        for handle in handles:
            self._count("failed")
            handle._finish(None, GenerationFailed(message))

    def _count(self, outcome: str) -> None:
        with self._stats_lock:
            setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)

    def _finish_unstarted(self, handle: Handle[Any], admitted: float, reason: FinishReason,
                          started: bool = False) -> None:
        """End a request that never reached a decode row (cancelled, timed out, or shut down); a
        scoring job may have `started` on its text."""
        if isinstance(handle, Generation):
            logprobs: list[CharLogprob] | None = [] if handle.request.logprobs is not None else None
            self._finish(Row(handle, RowSampler(SamplingParams(), 0), 0, admitted=admitted, logprobs=logprobs),
                         reason)
            return
        self._count({"cancelled": "cancelled", "timeout": "timeouts"}.get(reason, "failed"))
        handle._finish(None, ScoringStopped("timeout" if reason == "timeout" else "cancelled", started))

    def _sample(self, rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
        """One id per row, each drawn with that row's settings and its own random stream."""
        scale, top_k, top_p = [r.scale for r in rows], [r.top_k for r in rows], [r.top_p for r in rows]
        uniforms = [r.sampler.uniform() for r in rows]
        steered = [i for i, r in enumerate(rows) if r.steering is not None]
        constrained = [i for i, r in enumerate(rows) if r.constraint is not None]
        if steered or constrained:  # on a copy: log-probabilities report the model's own distribution
            logits = logits.clone()
            for i in steered:
                rows[i].steering.apply(logits[i])  # type: ignore[union-attr]
            for i in constrained:
                row = rows[i]
                row.matched_end = constrain(row.constraint, row.state, logits[i], row.scale,  # type: ignore[arg-type]
                                            row.sampler.params.greedy, row.sampler.uniform)
        ids = sample_batch(logits, scale, top_k, top_p, uniforms, self._decoder.kernels, self._sampled,
                           [r.min_p for r in rows])
        for i in steered:
            rows[i].steering.update(int(ids[i]))  # type: ignore[union-attr]
        for i in constrained:
            row = rows[i]
            if not row.matched_end:
                row.state = int(row.constraint.next[row.state, int(ids[i])])  # type: ignore[union-attr]
        return ids

    def _attach_logprobs(self, rows: list[Row], logits: torch.Tensor, tokens: list[int]) -> None:
        """Give each row that asked for log-probabilities the entry of the character it just sampled.
        Rows that did not ask cost one look each: no softmax, no sort, no copy."""
        asking = [i for i, row in enumerate(rows) if row.logprobs is not None]
        if not asking:
            return
        tops = [rows[i].gen.request.logprobs or 0 for i in asking]
        entries = sampled_logprobs(logits, asking, [tokens[i] for i in asking], tops, self.vocab.chars)
        for i, entry in zip(asking, entries):
            rows[i].pending = entry

    def _step(self) -> None:
        n = len(self._rows)
        try:
            if self.hooks.before_step is not None:
                self.hooks.before_step()
            self.stats.steps += 1
            self.stats.batch_rows += n
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

    def _advance(self, row: Row) -> bool:
        """Record the row's newly sampled token; finish the request if it is done. True = retire."""
        gen = row.gen
        if self._on_char is not None:
            self._on_char(gen, len(row.generated))
        if reason := gen.ended_early():
            return self._finish(row, reason)
        if row.matched_end:  # a complete match, ended by the model's choice
            return self._finish(row, "stop")
        row.generated.append(self.vocab.chars[row.token])
        if row.logprobs is not None:
            assert row.pending is not None, "a row that asks for logprobs got no entry for its character"
            row.logprobs.append(row.pending)
            row.pending = None
        held = 0
        if row.stops is not None:
            cut, held = row.stops.check(row.generated)
            if cut:
                del row.generated[len(row.generated) - cut :]
                if row.logprobs is not None:
                    del row.logprobs[len(row.generated) :]
                return self._finish(row, "stop")
        done = row.constraint
        if done is not None and done.accepting[row.state] and not done.grows[row.state]:
            return self._finish(row, "stop")  # a complete match that nothing can extend
        if len(row.generated) >= gen.request.length:
            return self._finish(row, "length")
        upto = len(row.generated) - held
        if upto > row.emitted:
            if row.logprobs is None:  # the common case, inline: this runs for every character
                gen._emit("".join(row.generated[row.emitted : upto]))
                row.emitted = upto
            else:
                self._emit(row, upto)
        return False

    def _emit(self, row: Row, upto: int) -> None:
        """Hand the row's characters up to `upto` (and their log-probabilities) to its request."""
        entries = row.logprobs[row.emitted : upto] if row.logprobs is not None else ()
        row.gen._emit("".join(row.generated[row.emitted : upto]), entries)
        row.emitted = upto

    def _finish(self, row: Row, reason: FinishReason) -> bool:
        gen = row.gen
        self._emit(row, len(row.generated))
        now = time.perf_counter()
        generated = "".join(row.generated)
        decode_s = now - row.decode_start if row.decode_start else 0.0
        self._count({"cancelled": "cancelled", "timeout": "timeouts"}.get(reason, "completed"))
        timings = Timings.from_seconds(row.admitted - gen.submitted, row.prefill_s, decode_s, len(generated))
        result = GenerationResult.for_request(gen.request, generated, reason, gen.random_seed, timings, row.logprobs)
        gen._finish(result)
        return True
