"""A completions request translated into the engine's terms (`Plan`), with every refusal that needs no
engine: parameters this model cannot honour, too many choices, a response too large to hold.

Semantics where OpenAI's words need a choice (the README says the same):
- `temperature` is 1/scale_factor; `temperature: 0` (or `top_p: 0`) is greedy decoding, argmax.
- Choice j of a prompt gets random seed `seed` for j = 0 and one derived from (seed, j) for the
  others, so the n choices differ and the same request gives the same n texts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from app.errors import ApiError
from app.openai_api.protocol import CompletionRequest
from charlm.constraint import CompiledConstraint
from charlm.sampling import MAX_RANDOM_SEED, MAX_SCALE_FACTOR, InvalidParameter, SamplingParams
from charlm.vocab import Vocab


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
    best_of: int = 0  # candidates generated per prompt, the n most likely returned (0: n)
    constraint: CompiledConstraint | None = None  # structured_outputs, compiled for the model

    @property
    def candidates(self) -> int:
        """Generations per prompt: best_of when it ranks, else n."""
        return max(self.best_of, self.n)

    @property
    def ranks(self) -> bool:
        return self.candidates > self.n

    @property
    def scores_prompts(self) -> bool:
        """echo with logprobs: each prompt's characters get their log-probabilities (a scoring job)."""
        return self.echo and self.logprobs is not None

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n

    def scorings(self) -> int:
        """Scoring jobs the plan queues: one per prompt of several characters when it scores prompts."""
        return sum(len(p) > 1 for p in self.prompts) if self.scores_prompts else 0

    def logprob_values(self) -> int:
        """Log-probabilities the whole response may carry: per choice, every echoed and generated
        character's own value and its alternatives. This bounds what the request makes the server hold."""
        if self.logprobs is None and not self.ranks:
            return 0
        # ranking needs each candidate's chosen characters' log-probabilities, asked for or not
        chars = sum((len(p) if self.echo else 0) + self.max_tokens for p in self.prompts) * self.candidates
        return chars * (1 + (self.logprobs or 0))


def unsupported(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param} is not supported by this model: {message}", param=param,
                    code="unsupported_parameter")


def refuse_unsupported(body: CompletionRequest) -> None:
    """Refuse what would change the text if honoured, and so must not be ignored."""
    n = body.n or 1
    if body.suffix:
        raise unsupported("suffix", "it generates left to right only; send no suffix (or an empty one)")
    if body.best_of is not None and body.best_of < n:
        raise ApiError(400, f"Invalid value for 'best_of': it must be at least n ({n}), got {body.best_of}",
                       param="best_of")
    if body.best_of is not None and body.best_of > n and body.stream:
        raise ApiError(400, "best_of above n cannot be streamed (the best are known only at the end): send "
                       "stream: false, or best_of equal to n", param="best_of")
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")


def prompts_of(body: CompletionRequest, vocab: Vocab) -> list[str]:
    """The prompt as a list of texts: a string, strings, or (lists of) vocabulary ids, one per character.
    Their length and characters are the engine's to check, when they are submitted."""
    prompt = body.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ApiError(400, "Invalid value for 'prompt': an empty list; send a string or a list of strings",
                       param="prompt")
    if isinstance(prompt[0], str):
        return [p for p in prompt if isinstance(p, str)]
    if isinstance(prompt[0], int):
        return [_decode(vocab, [t for t in prompt if isinstance(t, int)])]
    return [_decode(vocab, ids) for ids in prompt if isinstance(ids, list)]


def _decode(vocab: Vocab, ids: Sequence[int]) -> str:
    size = len(vocab)
    bad = sorted({i for i in ids if i >= size})
    if bad:
        shown = ", ".join(map(str, bad[:20])) + (f" and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise ApiError(400, f"Invalid value for 'prompt': token ids {shown} are not in the vocabulary (0 to "
                       f"{size - 1}; one id per character)", param="prompt")
    return "".join(vocab.chars[i] for i in ids)


def sampling_of(body: CompletionRequest) -> SamplingParams:
    """temperature → scale_factor = 1/temperature; 0 (or top_p 0) is greedy. Temperatures below
    1/MAX_SCALE_FACTOR use that factor, which already always picks the most likely character.
    Bias and penalties as OpenAI (and vLLM: repetition_penalty, min_p) define them; a value out of
    range is a 400 naming it."""
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    steering = {
        "logit_bias": _bias_ids(body.logit_bias or {}),
        "presence_penalty": body.presence_penalty or 0.0,
        "frequency_penalty": body.frequency_penalty or 0.0,
        "repetition_penalty": 1.0 if body.repetition_penalty is None else body.repetition_penalty,
    }
    try:
        if temperature == 0 or top_p == 0:
            return SamplingParams(greedy=True, **steering)  # type: ignore[arg-type]
        scale = min(1.0 / temperature, MAX_SCALE_FACTOR) if temperature > 1.0 / MAX_SCALE_FACTOR else MAX_SCALE_FACTOR
        return SamplingParams(scale_factor=scale, top_p=top_p if top_p < 1 else None, min_p=body.min_p or 0.0,
                              **steering)  # type: ignore[arg-type]
    except InvalidParameter as exc:
        raise ApiError(400, f"Invalid value for '{exc.field}': {exc.message}", param=exc.field) from None


def _bias_ids(bias: dict[str, float]) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias: token ids (here, a vocabulary character's index, as /tokenize gives it) as
    strings. Whether each id exists is the engine's to check against the model's vocabulary."""
    ids = []
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 7):
            raise ApiError(400, f"Invalid value for 'logit_bias': keys are token ids (whole numbers, as /tokenize "
                           f"gives them), got {key[:20]!r}", param="logit_bias")
        ids.append((int(key), value))
    return tuple(ids)


def choice_seed(seed: int | None, j: int) -> int | None:
    """Choice 0 uses `seed` itself (the same text as POST /generate with that random_seed); choice j > 0
    one derived from (seed, j), so that n choices differ and stay reproducible."""
    if seed is None or j == 0:
        return seed
    digest = hashlib.sha256(f"charlm-choice:{seed}:{j}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (MAX_RANDOM_SEED + 1)


@dataclass(frozen=True)
class PlanLimits:
    """What one request may ask of this server (both on /info)."""

    max_choices: int  # queue places: choices plus the prompts' scoring jobs
    max_logprob_values: int  # log-probabilities one response may carry


def plan_of(body: CompletionRequest, model: str, vocab: Vocab, limits: PlanLimits,
            constraint: CompiledConstraint | None = None) -> Plan:
    """The request as a Plan, or a 400 naming the parameter to change."""
    refuse_unsupported(body)
    stop = body.stop if isinstance(body.stop, list) else [body.stop] if body.stop else []
    plan = Plan(
        model=model, prompts=prompts_of(body, vocab), n=body.n or 1,
        max_tokens=16 if body.max_tokens is None else body.max_tokens, sampling=sampling_of(body),
        stop=tuple(stop), logprobs=body.logprobs, echo=bool(body.echo), seed=body.seed,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        best_of=(body.best_of or 0) if body.max_tokens != 0 else 0,  # nothing generated: nothing to rank
        constraint=constraint,
    )
    check_size(plan, limits)
    return plan


def check_size(plan: Plan, limits: PlanLimits) -> None:
    """Refuse a plan whose work or response is over the server's bounds, before anything is queued."""
    values = plan.logprob_values()
    if values > limits.max_logprob_values:
        echoed = "echoed prompt + " if plan.echo else ""
        raise ApiError(400, f"Invalid value for 'logprobs': ({echoed}max_tokens) characters x {plan.choices} "
                       f"choice(s) x (1 + {plan.logprobs} alternatives) = {values:,} log-probabilities; this server "
                       f"returns at most {limits.max_logprob_values:,} per request (max_logprob_values on /info): "
                       "lower n, max_tokens or logprobs, or leave out echo", param="logprobs")
    places = len(plan.prompts) * plan.candidates + plan.scorings()
    if places > limits.max_choices:
        scored = f" + {plan.scorings()} prompt scoring job(s) (echo with logprobs)" if plan.scorings() else ""
        param = "best_of" if plan.ranks else "n"
        raise ApiError(400, f"Invalid value for '{param}': {len(plan.prompts)} prompt(s) x {param}={plan.candidates} "
                       f"choices{scored} = {places} queue places; this server allows at most {limits.max_choices} "
                       "per request (max_choices on /info)", param=param)
