"""OpenAI's legacy completions API over the same engine: POST /v1/completions, GET /v1/models and
GET /v1/models/{model_id}, so that the `openai` SDK, LangChain and curl snippets written for OpenAI work
unchanged (with `base_url` pointing here). A character is a token: `max_tokens` and `usage` count
characters, and `logprobs` describes characters.

Semantics where OpenAI's words need a choice (the README says the same):
- `temperature` is 1/scale_factor; `temperature: 0` (or `top_p: 0`) is greedy decoding, argmax.
- Choice j of a prompt gets random seed `seed` for j = 0 and one derived from (seed, j) for the
  others, so the n choices differ and the same request gives the same n texts.
- `logprobs` are the model's own log-probabilities (before temperature and top_p), so a prompt scored
  with echo gets the same numbers as POST /score. With `echo`, the prompt's first character has
  logprob null (nothing precedes it; OpenAI did the same for the first token), and `text_offset`
  counts from the start of the prompt whether or not it is echoed, as OpenAI did.
- `finish_reason` is "stop" or "length". A request that runs past the server's request timeout
  ends with "length" and the text generated so far (as vLLM does for its limits).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from app.deps import Authorized, EngineDep, cancel_on_disconnect, served_model_id
from app.errors import ApiError, openai_error_body, queue_refusal, shut_down_error
from app.openai_schemas import (
    OPENAI_ERROR_RESPONSES,
    Completion,
    CompletionRequest,
    Model,
    ModelList,
)
from charlm.engine import (
    CharLogprob,
    Engine,
    EngineClosedError,
    Generation,
    GenerationFailed,
    GenerationRequest,
    GenerationResult,
    Handle,
    QueueFullError,
    ScoreRequest,
    ScoreResult,
    Scoring,
    ScoringStopped,
    validate_text,
)
from charlm.sampling import MAX_RANDOM_SEED, MAX_SCALE_FACTOR, InvalidParameter, SamplingParams

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Authorized],
                   responses={401: OPENAI_ERROR_RESPONSES[401]})

OWNED_BY = "charlm"

# The engine's names for what OpenAI's clients call otherwise: an error names the parameter sent.
_PARAMS = {"seed": "prompt", "text": "prompt", "length": "max_tokens", "random_seed": "seed", "top_k": "logprobs",
           "scale_factor": "temperature"}

STREAM_EXAMPLE = (
    'data: {"id": "cmpl-3f1c...", "object": "text_completion", "created": 1764531200, "model": "mysterious_island", '
    '"choices": [{"text": " was", "index": 0, "logprobs": null, "finish_reason": null}]}\n\n'
    'data: {"id": "cmpl-3f1c...", "object": "text_completion", "created": 1764531200, "model": "mysterious_island", '
    '"choices": [{"text": "", "index": 0, "logprobs": null, "finish_reason": "length"}]}\n\n'
    "data: [DONE]\n\n"
)
STREAM_RESPONSE: dict[str, Any] = {
    "description": "the completion; with `stream: true`, Server-Sent Events of completion chunks, then `data: [DONE]`",
    "content": {"text/event-stream": {"schema": {"type": "string"}, "example": STREAM_EXAMPLE}},
}


# --- models ---
def _model_card(request: Request) -> Model:
    return Model(id=served_model_id(request), created=_created(request), owned_by=OWNED_BY)


def _created(request: Request) -> int:
    """When the served model was made: its training date, else its file's time, else 0 (unknown)."""
    state = request.app.state
    date = (state.checkpoint.train or {}).get("date") if state.checkpoint is not None else None
    if isinstance(date, str):
        try:
            return int(datetime.fromisoformat(date).timestamp())
        except ValueError:
            pass
    try:
        return int(Path(state.settings.checkpoint).stat().st_mtime)
    except OSError:
        return 0


def check_model(request: Request, model: str) -> str:
    """The served model's id, or 404 model_not_found naming what is served."""
    served = served_model_id(request)
    if model != served:
        shown = model if len(model) <= 100 else model[:100] + "..."
        raise ApiError(404, f"The model '{shown}' does not exist: this server serves '{served}' (GET /v1/models)",
                       param="model", code="model_not_found")
    return served


@router.get("/models", response_model=ModelList, summary="OpenAI: list the served model")
async def list_models(request: Request) -> ModelList:
    """The one model this server serves; its id is what `model` must say in a completions request."""
    return ModelList(data=[_model_card(request)])


@router.get("/models/{model_id}", response_model=Model, summary="OpenAI: the served model, by id",
            responses={404: OPENAI_ERROR_RESPONSES[404]})
async def get_model(model_id: str, request: Request) -> Model:
    check_model(request, model_id)
    return _model_card(request)


# --- completions: the request as engine work ---
@dataclass(frozen=True)
class Plan:
    """A completions request, checked and translated into the engine's terms."""

    model: str
    prompts: list[str]
    n: int
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    logprobs: int | None
    echo: bool
    seed: int | None
    include_usage: bool

    @property
    def scores_prompts(self) -> bool:
        """echo with logprobs: each prompt's characters get their log-probabilities (a scoring job)."""
        return self.echo and self.logprobs is not None


def unsupported(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param} is not supported by this model: {message}", param=param,
                    code="unsupported_parameter")


def refuse_unsupported(body: CompletionRequest) -> None:
    """Refuse what would change the text if honoured, and so must not be ignored."""
    n = body.n or 1
    if body.suffix:
        raise unsupported("suffix", "it generates left to right only; send no suffix (or an empty one)")
    if body.best_of is not None and body.best_of != n:
        raise unsupported("best_of", f"best_of must equal n ({n}) or be left out; ranking choices is not implemented")
    if body.logit_bias:
        raise unsupported("logit_bias", "send no logit_bias (or an empty one)")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0):
            raise unsupported(name, "only 0 (or leaving it out) is accepted")
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")


def prompts_of(body: CompletionRequest, engine: Engine) -> list[str]:
    """The prompt as a list of texts: a string, strings, or (lists of) vocabulary ids, one per character.
    Each is checked as a seed is (length, characters), so errors come before any work is queued."""
    prompt = body.prompt
    if isinstance(prompt, str):
        texts = [prompt]
    elif not prompt:
        raise ApiError(400, "Invalid value for 'prompt': an empty list; send a string or a list of strings",
                       param="prompt")
    elif isinstance(prompt[0], str):
        texts = [p for p in prompt if isinstance(p, str)]
    elif isinstance(prompt[0], int):
        texts = [_decode(engine, [t for t in prompt if isinstance(t, int)])]
    else:
        texts = [_decode(engine, ids) for ids in prompt if isinstance(ids, list)]
    for text in texts:
        try:
            validate_text("prompt", text, engine.vocab, engine.limits.max_seed_chars)
        except InvalidParameter as exc:
            raise ApiError(400, f"Invalid value for 'prompt': {exc.message}", param="prompt") from None
    return texts


def _decode(engine: Engine, ids: Sequence[int]) -> str:
    size = len(engine.vocab)
    bad = sorted({i for i in ids if i >= size})
    if bad:
        shown = ", ".join(map(str, bad[:20])) + (f" and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise ApiError(400, f"Invalid value for 'prompt': token ids {shown} are not in the vocabulary (0 to "
                       f"{size - 1}; one id per character)", param="prompt")
    return "".join(engine.vocab.chars[i] for i in ids)


def sampling_of(body: CompletionRequest) -> SamplingParams:
    """temperature → scale_factor = 1/temperature; 0 (or top_p 0) is greedy. Temperatures below
    1/MAX_SCALE_FACTOR use that factor, which already always picks the most likely character."""
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    if temperature == 0 or top_p == 0:
        return SamplingParams(greedy=True)
    scale = min(1.0 / temperature, MAX_SCALE_FACTOR) if temperature > 1.0 / MAX_SCALE_FACTOR else MAX_SCALE_FACTOR
    return SamplingParams(scale_factor=scale, top_p=top_p if top_p < 1 else None)


def choice_seed(seed: int | None, j: int) -> int | None:
    """Choice 0 uses `seed` itself (the same text as POST /generate with that random_seed); choice j > 0
    one derived from (seed, j), so that n choices differ and stay reproducible."""
    if seed is None or j == 0:
        return seed
    digest = hashlib.sha256(f"charlm-choice:{seed}:{j}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (MAX_RANDOM_SEED + 1)


def plan_of(body: CompletionRequest, request: Request, engine: Engine) -> Plan:
    model = check_model(request, body.model)
    refuse_unsupported(body)
    prompts = prompts_of(body, engine)
    n = body.n or 1
    limit = request.app.state.settings.max_choices
    if len(prompts) * n > limit:
        raise ApiError(400, f"Invalid value for 'n': {len(prompts)} prompt(s) x n={n} choices; this server allows "
                       f"at most {limit} per request (max_choices on /info)", param="n")
    stop = body.stop if isinstance(body.stop, list) else [body.stop] if body.stop else []
    return Plan(
        model=model, prompts=prompts, n=n, max_tokens=16 if body.max_tokens is None else body.max_tokens,
        sampling=sampling_of(body), stop=tuple(stop), logprobs=body.logprobs, echo=bool(body.echo),
        seed=body.seed, include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )


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


def submit(plan: Plan, request: Request, engine: Engine) -> Work:
    """Queue the plan's scorings and generations (the n choices of a prompt together, so they share its
    prefill); all or none: a refusal cancels what was queued before it."""
    timeout = request.app.state.settings.request_timeout
    scorings: list[Scoring | None] = []
    try:
        for prompt in plan.prompts:
            needed = plan.scores_prompts and len(prompt) > 1
            scorings.append(engine.score(ScoreRequest(prompt, plan.logprobs or 0, timeout=timeout)) if needed else None)
        gens: list[Generation | None] = [None] * (len(plan.prompts) * plan.n)
        if plan.max_tokens > 0:
            gens = list(engine.submit_many([
                GenerationRequest(seed=prompt, length=plan.max_tokens, sampling=plan.sampling,
                                  random_seed=choice_seed(plan.seed, j), stop=plan.stop, timeout=timeout,
                                  logprobs=plan.logprobs)
                for prompt in plan.prompts for j in range(plan.n)
            ]))
    except (InvalidParameter, QueueFullError, EngineClosedError) as exc:
        for scoring in scorings:
            if scoring is not None:
                scoring.cancel()
        raise refusal(exc, request) from None
    return Work(scorings, gens)


def refusal(exc: InvalidParameter | QueueFullError | EngineClosedError, request: Request) -> ApiError:
    """A request the engine would not queue, as the error the client gets (and counted)."""
    metrics = request.app.state.metrics
    if isinstance(exc, InvalidParameter):
        metrics.rejections.labels("invalid").inc()
        param = _PARAMS.get(exc.field, exc.field)
        return ApiError(400, f"Invalid value for '{param}': {exc.message}", param=param)
    return queue_refusal(exc, request)


def engine_error(exc: BaseException) -> ApiError:
    """An engine outcome other than a result (or a bug on the way), as the error the client gets."""
    if isinstance(exc, EngineClosedError):
        return shut_down_error()
    if isinstance(exc, ScoringStopped):
        return ApiError(503, "scoring the prompt did not finish within the request timeout; send a shorter prompt",
                        headers={"Retry-After": "1"})
    if isinstance(exc, GenerationFailed):
        return ApiError(500, str(exc))
    return ApiError(500, f"internal error: {type(exc).__name__}")


# --- completions: engine results as OpenAI's objects ---
def top_logprobs(entry: CharLogprob) -> dict[str, float] | None:
    """OpenAI's top_logprobs entry: the alternatives, most likely first, and the chosen character
    (so up to logprobs + 1 keys, as OpenAI documented); null where the logprob is null."""
    if entry.logprob is None:
        return None
    top = dict(entry.top)
    top.setdefault(entry.char, entry.logprob)
    return top


def logprobs_object(entries: Sequence[CharLogprob], offset: int) -> dict[str, Any]:
    """OpenAI's logprobs object for consecutive characters, the first at `offset` in prompt + completion."""
    return {
        "tokens": [e.char for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [top_logprobs(e) for e in entries],
        "text_offset": list(range(offset, offset + len(entries))),
    }


def finish_reason(result: GenerationResult | None) -> str:
    """'stop' when a stop string ended it; otherwise 'length' (its max_tokens, or the timeout cut it)."""
    return "stop" if result is not None and result.finish_reason == "stop" else "length"


def prompt_entries(prompt: str, scored: ScoreResult | None) -> list[CharLogprob]:
    """The prompt's characters with their log-probabilities (the first null), from its scoring; a
    one-character prompt needs none."""
    if scored is None:
        assert len(prompt) == 1, "a prompt of several characters is scored before its logprobs are shown"
        return [CharLogprob(prompt, None)]
    return scored.per_char


def choice(plan: Plan, index: int, result: GenerationResult | None, scored: ScoreResult | None) -> dict[str, Any]:
    prompt = plan.prompts[index // plan.n]
    generated = result.generated if result is not None else ""
    logprobs = None
    if plan.logprobs is not None:
        entries = prompt_entries(prompt, scored) if plan.echo else []
        entries = entries + (result.logprobs or [] if result is not None else [])
        logprobs = logprobs_object(entries, 0 if plan.echo else len(prompt))
    text = prompt + generated if plan.echo else generated
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason(result)}


def usage(plan: Plan, completion_chars: int) -> dict[str, int]:
    prompt_chars = sum(len(p) for p in plan.prompts)
    return {"prompt_tokens": prompt_chars, "completion_tokens": completion_chars,
            "total_tokens": prompt_chars + completion_chars}


def record(request: Request, result: GenerationResult | None) -> None:
    if result is not None:
        metrics = request.app.state.metrics
        metrics.chars.inc(result.usage.generated_chars)
        metrics.finished.labels(result.finish_reason).inc()


@router.post(
    "/completions",
    response_model=Completion,
    summary="OpenAI: legacy completions (a character is a token)",
    responses={**OPENAI_ERROR_RESPONSES, 200: STREAM_RESPONSE},
)
async def completions(body: CompletionRequest, request: Request, engine: EngineDep) -> Any:
    """OpenAI's `POST /v1/completions`, field for field, over the same engine as `POST /generate`.
    `temperature` 0 is greedy; `echo` with `max_tokens` 0 and `logprobs` scores the prompt (first
    character null, the rest as POST /score). A timed-out request ends with finish_reason "length"
    and the partial text."""
    plan = plan_of(body, request, engine)
    work = submit(plan, request, engine)
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return StreamingResponse(
            stream_chunks(plan, work, request, completion_id, created),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    watcher = cancel_on_disconnect(request, work.handles)
    try:
        scored = await asyncio.gather(*(_outcome(s) for s in work.scorings))
        results = await asyncio.gather(*(_outcome(g) for g in work.gens))
    except (GenerationFailed, EngineClosedError, ScoringStopped) as exc:
        raise engine_error(exc) from None
    finally:
        watcher.cancel()
        work.cancel()  # no-op when finished; frees the rows if this handler itself was cancelled
    for result in results:
        record(request, result)
    choices = [choice(plan, c, result, scored[c // plan.n]) for c, result in enumerate(results)]
    generated = sum(len(r.generated) for r in results if r is not None)
    return {"id": completion_id, "object": "text_completion", "created": created, "model": plan.model,
            "choices": choices, "usage": usage(plan, generated), "system_fingerprint": None}


async def _outcome(handle: Handle[Any] | None) -> Any:
    return None if handle is None else await handle.wait()


# --- streaming ---
@dataclass
class _Piece:
    """One choice's chunk on its way to the stream; the finishing one carries the engine's result."""

    choice: dict[str, Any]
    result: GenerationResult | None = None
    last: bool = False


_Item = _Piece | BaseException


def _sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


async def stream_chunks(plan: Plan, work: Work, request: Request, completion_id: str, created: int
                        ) -> AsyncIterator[bytes]:
    """Completion chunks as each choice's characters arrive (at most one chunk per choice per
    CHARLM_STREAM_INTERVAL_MS, as /generate/stream), each choice ending with a chunk that carries its
    finish_reason; then the usage chunk (with stream_options.include_usage) and `data: [DONE]`.
    A failure mid-stream is one `data: {"error": ...}` event (which OpenAI's SDK raises), then the end."""
    interval = request.app.state.settings.stream_interval_ms / 1000
    head: dict[str, Any] = {"id": completion_id, "object": "text_completion", "created": created, "model": plan.model}
    if plan.include_usage:
        head["usage"] = None
    queue: asyncio.Queue[_Item] = asyncio.Queue()
    scorings = [asyncio.ensure_future(_outcome(s)) for s in work.scorings]

    async def pump(index: int) -> None:
        try:
            await _pump_choice(plan, index, work.gens[index], scorings[index // plan.n], queue, interval)
        except Exception as exc:  # whatever it is, the stream ends with an error event instead of waiting forever
            await queue.put(exc)

    watcher = cancel_on_disconnect(request, work.handles)
    pumps = [asyncio.ensure_future(pump(c)) for c in range(len(work.gens))]
    generated, running = 0, len(pumps)
    try:
        while running:
            item = await queue.get()
            if isinstance(item, BaseException):
                error = engine_error(item)
                yield _sse(openai_error_body(error.status, error.message))
                return
            if item.last:
                running -= 1
                record(request, item.result)
                generated += item.result.usage.generated_chars if item.result is not None else 0
            yield _sse({**head, "choices": [item.choice]})
        if plan.include_usage:
            yield _sse({**head, "choices": [], "usage": usage(plan, generated)})
        yield _sse("[DONE]")
    finally:
        watcher.cancel()
        for task in [*pumps, *scorings]:
            task.cancel()
            if task.done() and not task.cancelled():
                task.exception()  # seen: reported above, or moot once the client has gone
        work.cancel()


async def _pump_choice(plan: Plan, index: int, gen: Generation | None, scoring: asyncio.Future[Any],
                       queue: asyncio.Queue[_Item], interval: float) -> None:
    """One choice's chunks into `queue`: the echoed prompt, the generated pieces, the finishing chunk."""
    prompt = plan.prompts[index // plan.n]
    offset = 0 if plan.echo else len(prompt)  # text_offset of the next character
    if plan.echo:
        logprobs = None
        if plan.logprobs is not None:  # shielded: the choices of one prompt share its scoring
            logprobs = logprobs_object(prompt_entries(prompt, await asyncio.shield(scoring)), 0)
        await queue.put(_Piece({"text": prompt, "index": index, "logprobs": logprobs, "finish_reason": None}))
        offset = len(prompt)
    result = None
    if gen is not None:
        seen = 0
        async for text in gen:
            logprobs = None
            if plan.logprobs is not None:
                logprobs = logprobs_object(gen.logprobs[seen : seen + len(text)], offset)
            seen, offset = seen + len(text), offset + len(text)
            await queue.put(_Piece({"text": text, "index": index, "logprobs": logprobs, "finish_reason": None}))
            if interval:
                await asyncio.sleep(interval)  # what arrives meanwhile goes out as one chunk
        result = await gen.wait()
    last = {"text": "", "index": index, "logprobs": None, "finish_reason": finish_reason(result)}
    await queue.put(_Piece(last, result, last=True))
