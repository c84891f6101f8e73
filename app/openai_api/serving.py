"""Serving a completions Plan: submit its work to the engine, then answer in OpenAI's objects, whole or
streamed.

Both answers are written as the client reads them and never built whole: a whole response is sent one
choice at a time (the echoed prompt's log-probabilities encoded once per prompt and shared by its
choices), and a stream encodes a choice's new characters only when the client is ready for the next
event. So memory stays what the engine holds for the request, which `Plan.logprob_values` bounds, and no
response holds the event loop for longer than one choice takes to encode.

- `logprobs` are the model's own log-probabilities (before temperature and top_p), so a prompt scored
  with echo gets the same numbers as POST /score. With `echo`, the prompt's first character has
  logprob null (nothing precedes it; OpenAI did the same for the first token), and `text_offset`
  counts from the start of the prompt whether or not it is echoed, as OpenAI did.
- `finish_reason` is "stop" or "length". A request that runs past the server's request timeout
  ends with "length" and the text generated so far (as vLLM does for its limits).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.errors import ApiError, openai_error_body, queue_refusal, scoring_stopped_error, shut_down_error
from app.metrics import Metrics
from app.openai_api.plan import Plan, choice_seed
from app.sse import DONE, ServerSentEvent
from charlm.engine import Engine
from charlm.handles import Generation, Handle, Scoring
from charlm.request import (
    CharLogprob,
    EngineClosedError,
    GenerationFailed,
    GenerationRequest,
    GenerationResult,
    QueueFullError,
    ScoreRequest,
    ScoreResult,
    ScoringStopped,
    validate_text,
)
from charlm.sampling import InvalidParameter

# The engine's names for what OpenAI's clients call otherwise: an error names the parameter sent.
_PARAMS = {"seed": "prompt", "text": "prompt", "length": "max_tokens", "random_seed": "seed", "top_k": "logprobs",
           "scale_factor": "temperature"}


@dataclass
class Work:
    """What a plan queued: per prompt its scoring (echo + logprobs), per choice its generation
    (None with max_tokens 0). Choice c belongs to prompt c // n, as OpenAI orders them."""

    scorings: list[Scoring | None]
    gens: list[Generation | None]

    @property
    def handles(self) -> list[Handle[Any]]:
        return [h for h in [*self.scorings, *self.gens] if h is not None]

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()  # no-op for finished ones


def submit(plan: Plan, engine: Engine, timeout: float, metrics: Metrics) -> Work:
    """Queue the plan's scorings and generations (the n choices of a prompt together, so they share its
    prefill); all or none: a refusal cancels what was queued before it."""
    scorings: list[Scoring | None] = []
    try:
        for prompt in plan.prompts:
            needed = plan.scores_prompts and len(prompt) > 1
            scorings.append(engine.score(ScoreRequest(prompt, plan.logprobs or 0, timeout=timeout)) if needed else None)
        gens: list[Generation | None] = [None] * plan.choices
        if plan.max_tokens > 0:
            logprobs = 0 if plan.ranks and plan.logprobs is None else plan.logprobs  # ranking reads them
            gens = list(engine.submit_many([
                GenerationRequest(seed=prompt, length=plan.max_tokens, sampling=plan.sampling,
                                  random_seed=choice_seed(plan.seed, j), stop=plan.stop, timeout=timeout,
                                  logprobs=logprobs, constraint=plan.constraint)
                for prompt in plan.prompts for j in range(plan.candidates)
            ]))
        else:  # nothing to generate: the prompts are still checked as the engine checks a seed
            for prompt in plan.prompts:
                validate_text("prompt", prompt, engine.vocab, engine.limits.max_seed_chars)
    except (InvalidParameter, QueueFullError, EngineClosedError) as exc:
        for scoring in scorings:
            if scoring is not None:
                scoring.cancel()
        raise refusal(exc, metrics) from None
    return Work(scorings, gens)


def best(plan: Plan, results: Sequence[GenerationResult | None]) -> list[GenerationResult | None]:
    """Each prompt's n candidates with the highest cumulative log-probability (the model's, of the
    characters chosen), most likely first; ties keep the candidates' order. Without best_of, all."""
    if not plan.ranks:
        return list(results)
    chosen: list[GenerationResult | None] = []
    for p in range(len(plan.prompts)):
        group = results[p * plan.candidates : (p + 1) * plan.candidates]
        chosen += sorted(group, key=lambda r: -cumulative_logprob(r))[: plan.n]
    return chosen


def cumulative_logprob(result: GenerationResult | None) -> float:
    if result is None:
        return -math.inf
    return sum(e.logprob for e in result.logprobs or () if e.logprob is not None)


def refusal(exc: InvalidParameter | QueueFullError | EngineClosedError, metrics: Metrics) -> ApiError:
    """A request the engine would not queue, as the error the client gets (and counted)."""
    if isinstance(exc, InvalidParameter):
        metrics.rejections.labels("invalid").inc()
        param = _PARAMS.get(exc.field, exc.field)
        return ApiError(400, f"Invalid value for '{param}': {exc.message}", param=param)
    return queue_refusal(exc, metrics)


def engine_error(exc: BaseException) -> ApiError:
    """An engine outcome other than a result (or a bug on the way), as the error the client gets."""
    if isinstance(exc, EngineClosedError):
        return shut_down_error()
    if isinstance(exc, ScoringStopped):
        return scoring_stopped_error(exc, "prompt")
    if isinstance(exc, GenerationFailed):
        return ApiError(500, str(exc))
    return ApiError(500, f"internal error: {type(exc).__name__}")


async def outcome(handle: Handle[Any] | None) -> Any:
    return None if handle is None else await handle.wait()


# --- OpenAI's objects, encoded piece by piece ---
def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def top_logprobs(entry: CharLogprob) -> dict[str, float] | None:
    """OpenAI's top_logprobs entry: the alternatives, most likely first, and the chosen character
    (so up to logprobs + 1 keys, as OpenAI documented); null where the logprob is null."""
    if entry.logprob is None:
        return None
    top = dict(entry.top)
    top.setdefault(entry.char, entry.logprob)
    return top


@dataclass(frozen=True)
class Columns:
    """The four arrays of OpenAI's logprobs object for a run of characters, encoded, without brackets,
    so that runs (an echoed prompt, then the completion) join without decoding either again."""

    tokens: str = ""
    token_logprobs: str = ""
    top_logprobs: str = ""
    text_offset: str = ""

    @classmethod
    def of(cls, entries: Sequence[CharLogprob], offset: int) -> Columns:
        """The run's characters, the first at `offset` in prompt + completion."""
        if not entries:
            return cls()
        return cls(_dumps([e.char for e in entries])[1:-1], _dumps([e.logprob for e in entries])[1:-1],
                   _dumps([top_logprobs(e) for e in entries])[1:-1],
                   _dumps(list(range(offset, offset + len(entries))))[1:-1])

    def object(self, *more: Columns) -> str:
        """OpenAI's logprobs object of this run followed by `more`."""
        runs = (self, *more)

        def column(name: str) -> str:
            return "[" + ",".join(part for run in runs if (part := getattr(run, name))) + "]"

        return (f'{{"tokens":{column("tokens")},"token_logprobs":{column("token_logprobs")},'
                f'"top_logprobs":{column("top_logprobs")},"text_offset":{column("text_offset")}}}')


def prompt_entries(prompt: str, scored: ScoreResult | None) -> list[CharLogprob]:
    """The prompt's characters with their log-probabilities (the first null), from its scoring; a
    one-character prompt needs none."""
    if scored is None:
        assert len(prompt) == 1, "a prompt of several characters is scored before its logprobs are shown"
        return [CharLogprob(prompt, None)]
    return scored.per_char


def finish_reason(result: GenerationResult | None) -> str:
    """'stop' when a stop string ended it; otherwise 'length' (its max_tokens, or the timeout cut it)."""
    return "stop" if result is not None and result.finish_reason == "stop" else "length"


def choice_json(index: int, text: str, logprobs: str | None, finish: str | None) -> str:
    return (f'{{"text":{_dumps(text)},"index":{index},"logprobs":{logprobs or "null"},'
            f'"finish_reason":{_dumps(finish)}}}')


def usage(plan: Plan, completion_chars: int) -> dict[str, int]:
    prompt_chars = sum(len(p) for p in plan.prompts)
    return {"prompt_tokens": prompt_chars, "completion_tokens": completion_chars,
            "total_tokens": prompt_chars + completion_chars}


@dataclass(frozen=True)
class Header:
    """What every object of one completion repeats."""

    id: str
    created: int
    model: str
    fingerprint: str  # which weights made it (OpenAI's system_fingerprint): the model's version

    def fields(self) -> str:
        return (f'"id":{_dumps(self.id)},"object":"text_completion","created":{self.created},'
                f'"model":{_dumps(self.model)},"system_fingerprint":{_dumps(self.fingerprint)}')


async def completion_body(plan: Plan, header: Header, scored: Sequence[ScoreResult | None],
                          results: Sequence[GenerationResult | None]) -> AsyncIterator[bytes]:
    """The whole completion as JSON, one choice per piece, letting other work run between pieces."""
    yield ("{" + header.fields() + ',"choices":[').encode()
    echoed: dict[int, Columns] = {}  # per prompt, encoded once for all its choices
    for c, result in enumerate(results):
        p = c // plan.n
        prompt = plan.prompts[p]
        logprobs = None
        if plan.logprobs is not None:
            if plan.echo and p not in echoed:
                echoed[p] = Columns.of(prompt_entries(prompt, scored[p]), 0)
            generated = Columns.of(result.logprobs or [] if result is not None else [], len(prompt))
            logprobs = echoed[p].object(generated) if plan.echo else generated.object()
        text = (prompt if plan.echo else "") + (result.generated if result is not None else "")
        yield (("," if c else "") + choice_json(c, text, logprobs, finish_reason(result))).encode()
        await asyncio.sleep(0)
    generated_chars = sum(len(r.generated) for r in results if r is not None)
    yield f'],"usage":{_dumps(usage(plan, generated_chars))}}}'.encode()


# --- streaming ---
@dataclass(eq=False)
class _ChoiceStream:
    """One choice's progress: what its reader has received and what the stream has sent."""

    index: int
    offset: int  # text_offset of the next character sent
    echo: str | None = None  # the echoed prompt's logprobs object, once known ("null" without logprobs)
    echo_sent: bool = False
    parts: list[str] = field(default_factory=list)  # received, not yet sent
    sent: int = 0  # generated characters sent
    result: GenerationResult | None = None
    finished: bool = False  # its reader has everything
    closed: bool = False  # its finishing chunk is out
    error: BaseException | None = None


@dataclass
class CompletionStream:
    """The events of a streamed completion, encoded only as the client is ready for them.

    A reader task per choice collects its characters as the engine hands them out (a few short
    strings: the characters' log-probabilities stay where the engine keeps them); the stream turns
    what is there into at most one chunk per choice per CHARLM_STREAM_INTERVAL_MS, each choice ending
    with a chunk that carries its finish_reason; then the usage chunk (with
    stream_options.include_usage) and `data: [DONE]`. A failure mid-stream is one `data: {"error": ...}`
    event (which OpenAI's SDK raises), then the end."""

    plan: Plan
    work: Work
    header: Header
    interval: float
    metrics: Metrics
    _news: asyncio.Event = field(default_factory=asyncio.Event)
    _echoed: dict[int, str] = field(default_factory=dict)  # per prompt, encoded once for all its choices

    async def events(self) -> AsyncGenerator[ServerSentEvent, None]:
        streams = [_ChoiceStream(c, 0 if self.plan.echo else len(self.plan.prompts[c // self.plan.n]))
                   for c in range(self.plan.choices)]
        scorings = [asyncio.ensure_future(outcome(s)) for s in self.work.scorings]
        readers = [asyncio.ensure_future(self._read(s, scorings[s.index // self.plan.n])) for s in streams]
        generated = 0
        try:
            while not all(s.closed for s in streams):
                await self._news.wait()
                self._news.clear()
                if failed := next((s.error for s in streams if s.error is not None), None):
                    error = engine_error(failed)
                    yield ServerSentEvent(raw_data=_dumps(openai_error_body(error.status, error.message)))
                    return
                for stream in streams:
                    finished = stream.finished  # before taking its text: a later end is seen next round
                    for chunk in self._chunks(stream):
                        yield ServerSentEvent(raw_data=chunk)
                    if finished and not stream.closed:
                        result, stream.result, stream.closed = stream.result, None, True
                        generated += result.usage.generated_chars if result is not None else 0
                        self.metrics.record(self.header.model, result)
                        yield ServerSentEvent(raw_data=self._chunk(choice_json(stream.index, "", None,
                                                                               finish_reason(result))))
                if self.interval and not all(s.closed for s in streams):
                    await asyncio.sleep(self.interval)  # what arrives meanwhile goes out as one chunk
            if self.plan.include_usage:
                yield ServerSentEvent(raw_data="{" + self.header.fields() + ',"choices":[],"usage":'
                                      + _dumps(usage(self.plan, generated)) + "}")
            yield DONE
        finally:
            for task in [*readers, *scorings]:
                task.cancel()
                if task.done() and not task.cancelled():
                    task.exception()  # seen: reported above, or moot once the client has gone
            self.work.cancel()

    def _chunk(self, choice: str) -> str:
        usage_field = ',"usage":null' if self.plan.include_usage else ""
        return "{" + self.header.fields() + ',"choices":[' + choice + "]" + usage_field + "}"

    def _chunks(self, stream: _ChoiceStream) -> list[str]:
        """The chunks of what `stream` has received and not sent: the echoed prompt, then new text."""
        chunks = []
        prompt = self.plan.prompts[stream.index // self.plan.n]
        if self.plan.echo and not stream.echo_sent:
            if stream.echo is None:
                return []  # its scoring comes first
            chunks.append(self._chunk(choice_json(stream.index, prompt, stream.echo, None)))
            stream.echo_sent, stream.offset = True, len(prompt)
        if stream.parts:
            text = "".join(stream.parts)
            stream.parts.clear()
            logprobs = None
            gen = self.work.gens[stream.index]
            if self.plan.logprobs is not None and gen is not None:
                logprobs = Columns.of(gen.logprobs[stream.sent : stream.sent + len(text)], stream.offset).object()
            stream.sent, stream.offset = stream.sent + len(text), stream.offset + len(text)
            chunks.append(self._chunk(choice_json(stream.index, text, logprobs, None)))
        return chunks

    def _echo(self, p: int, scored: ScoreResult | None) -> str:
        """Prompt p's logprobs object as echoed, encoded by the first of its choices to ask."""
        if self.plan.logprobs is None:
            return "null"
        if p not in self._echoed:
            self._echoed[p] = Columns.of(prompt_entries(self.plan.prompts[p], scored), 0).object()
        return self._echoed[p]

    async def _read(self, stream: _ChoiceStream, scoring: asyncio.Future[Any]) -> None:
        """Collect one choice's characters and its end, waking the stream for each."""
        try:
            if self.plan.echo:  # shielded: the choices of one prompt share its scoring
                scored = await asyncio.shield(scoring) if self.plan.logprobs is not None else None
                stream.echo = self._echo(stream.index // self.plan.n, scored)
                self._news.set()
            gen = self.work.gens[stream.index]
            if gen is not None:
                async for text in gen:
                    stream.parts.append(text)
                    self._news.set()
                stream.result = await gen.wait()
            stream.finished = True
        except Exception as exc:  # whatever it is, the stream ends with an error event instead of waiting forever
            stream.error = exc
        self._news.set()
