"""What a caller hands the engine and gets back: requests, their limits and validation, results, errors.

Everything here is plain data and checks, so the service, the command line and the library can build,
validate and describe requests without starting an engine. The engine (charlm/engine.py) runs them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from charlm.sampling import MAX_RANDOM_SEED, InvalidParameter, SamplingParams
from charlm.vocab import UnknownCharactersError, Vocab

if TYPE_CHECKING:  # only the type: requests must not import numpy's tables or the compiler
    from charlm.constraint import CompiledConstraint

__all__ = [
    "FinishReason",
    "DEFAULT_LENGTH",
    "MAX_LOGPROBS",
    "RequestError",
    "QueueFullError",
    "EngineClosedError",
    "GenerationFailed",
    "ScoringStopped",
    "EngineLimits",
    "CharLogprob",
    "GenerationRequest",
    "ScoreRequest",
    "Usage",
    "Timings",
    "GenerationResult",
    "ScoreResult",
    "validate",
    "validate_score",
    "validate_text",
    "is_int",
]

FinishReason = Literal["length", "stop", "cancelled", "timeout"]

DEFAULT_LENGTH = 200  # characters generated when a request does not say; the CLI and the API use it too

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
    """A scoring job ended before its text did: `reason` is "timeout" (it ran past its timeout) or
    "cancelled" (its caller went away). `started` says whether any of the text had been scored: a
    timeout before that was spent waiting (the server is busy; retry), after it the text is too long
    for the timeout (score a shorter text or raise the timeout)."""

    def __init__(self, reason: Literal["cancelled", "timeout"], started: bool = False):
        super().__init__(f"scoring was {'cancelled' if reason == 'cancelled' else 'stopped by its timeout'}")
        self.reason, self.started = reason, started


@dataclass(frozen=True)
class EngineLimits:
    max_length: int = 2000  # characters generated per request
    max_seed_chars: int = 10_000  # characters of seed text per request
    max_batch: int = 64  # rows decoded together in one step
    max_queue: int = 256  # requests waiting to be admitted before submit() refuses
    max_stop: int = 4  # stop strings per request
    max_stop_chars: int = 64  # characters per stop string
    max_score_chars: int = 10_000  # characters of text per scoring request


@dataclass(frozen=True, slots=True)
class CharLogprob:
    """One character and how likely the model found it there: the natural log of its probability under
    the model's own distribution (before scale_factor and filters, so it does not depend on how the
    character was sampled), with the most likely alternatives.

    A response may hold hundreds of thousands of these until its client reads them, so the
    alternatives are kept packed (their characters as one string, their values as doubles: about 250
    bytes an entry with five, against 600 as pairs of Python objects) and unpacked by `top`."""

    char: str
    logprob: float | None  # None for the first character of a scored text: nothing precedes it to predict it
    top_chars: str = ""  # the alternatives, most likely first, ties by id
    top_logprobs: Sequence[float] = ()  # their log-probabilities, in the same order

    @property
    def top(self) -> tuple[tuple[str, float], ...]:
        """(character, logprob) of each alternative, most likely first."""
        return tuple(zip(self.top_chars, self.top_logprobs))


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
    # The text generated must match it (charlm/constraint.py): compiled for this model's vocabulary.
    constraint: CompiledConstraint | None = None


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

    @classmethod
    def from_seconds(cls, queue_s: float, prefill_s: float, generate_s: float, chars: int) -> Timings:
        """As reported: milliseconds to the microsecond, characters per second to a tenth."""
        return cls(
            queue_ms=_ms(queue_s),
            prefill_ms=_ms(prefill_s),
            generate_ms=_ms(generate_s),
            chars_per_s=round(chars / generate_s, 1) if generate_s > 0 else 0.0,
        )


@dataclass
class GenerationResult:
    text: str  # seed + generated, as the notebook returned it
    generated: str
    finish_reason: FinishReason
    random_seed: int
    usage: Usage
    timings: Timings
    logprobs: list[CharLogprob] | None = None  # one per generated character, when the request asked

    @classmethod
    def for_request(cls, request: GenerationRequest, generated: str, reason: FinishReason, random_seed: int,
                    timings: Timings, logprobs: list[CharLogprob] | None = None) -> GenerationResult:
        """The result of `request`, which generated `generated`: its text and usage follow from the two."""
        usage = Usage(seed_chars=len(request.seed), generated_chars=len(generated))
        return cls(text=request.seed + generated, generated=generated, finish_reason=reason,
                   random_seed=random_seed, usage=usage, timings=timings, logprobs=logprobs)


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

    @classmethod
    def from_per_char(cls, text: str, per_char: list[CharLogprob], queue_s: float, score_s: float) -> ScoreResult:
        """The result of scoring `text`, whose characters' entries are `per_char`, the first unscored."""
        total = math.fsum(entry.logprob for entry in per_char[1:] if entry.logprob is not None)
        chars = len(text) - 1
        return cls(text=text, chars=chars, logprob=total, bits_per_char=-total / chars / math.log(2),
                   per_char=per_char, queue_ms=_ms(queue_s), score_ms=_ms(score_s))


def _ms(seconds: float) -> float:
    """Seconds as the milliseconds results report, to the microsecond."""
    return round(seconds * 1e3, 3)


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
    if value is not None and not (is_int(value) and 0 <= value <= MAX_LOGPROBS):
        raise RequestError(field_name, f"must be a whole number between 0 and {MAX_LOGPROBS}, got {value}")


def validate(request: GenerationRequest, vocab: Vocab, limits: EngineLimits) -> None:
    """Refuse a request with an error naming the field and the limit."""
    validate_text("seed", request.seed, vocab, limits.max_seed_chars)
    if not is_int(request.length) or not 1 <= request.length <= limits.max_length:
        raise RequestError("length", f"must be a whole number between 1 and {limits.max_length}, got {request.length}")
    if not isinstance(request.sampling, SamplingParams):
        raise RequestError("sampling", "must be a SamplingParams")
    if request.random_seed is not None and not (
        is_int(request.random_seed) and 0 <= request.random_seed <= MAX_RANDOM_SEED
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
    _validate_bias(request.sampling.logit_bias, len(vocab))
    if request.constraint is not None:
        _validate_constraint(request, vocab)


def _validate_constraint(request: GenerationRequest, vocab: Vocab) -> None:
    """A constraint compiled for this vocabulary, and no stop string that its text can never hold."""
    constraint = request.constraint
    assert constraint is not None
    if constraint.chars != vocab.chars:
        raise RequestError("constraint", "was compiled for another vocabulary: compile it for this model's")
    for s in request.stop:
        if vocab.unknown(s) or not constraint.can_spell(vocab.encode(s).tolist()):
            raise RequestError("stop", f"{s!r} can never appear in a text that matches the constraint, so it "
                               "would never stop it: remove it, or change the constraint")


def _validate_bias(bias: tuple[tuple[int, float], ...], vocab_size: int) -> None:
    """The ids a bias names exist in this model's vocabulary, and name each at most once."""
    if len(bias) > vocab_size:
        raise RequestError("logit_bias", f"at most {vocab_size} entries (the vocabulary's size), got {len(bias)}")
    ids = [token for token, _ in bias]
    if any(token >= vocab_size for token in ids):
        raise RequestError("logit_bias", f"vocabulary ids run from 0 to {vocab_size - 1}, got {max(ids)}")
    if len(set(ids)) < len(ids):
        raise RequestError("logit_bias", "names a character more than once")


def validate_score(request: ScoreRequest, vocab: Vocab, limits: EngineLimits) -> None:
    """A text of at least two characters (the first is context for the second) within the limit."""
    validate_text("text", request.text, vocab, limits.max_score_chars, min_chars=2)
    _validate_logprobs("top_k", request.top_k)
    if request.timeout is not None and not request.timeout > 0:
        raise RequestError("timeout", f"must be > 0 seconds, got {request.timeout}")


def is_int(value: object) -> bool:
    """A whole number and not a bool: JSON's true would otherwise pass as 1 (bool is an int subclass)."""
    return isinstance(value, int) and not isinstance(value, bool)
