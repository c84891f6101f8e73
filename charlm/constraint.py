"""Structured output, exact at the character level: a constraint compiled to a table of which
characters may come next.

A constraint is a regex (Rust syntax, as vLLM's backends take it), a `choice` among strings, or a
JSON schema (turned into a regex by outlines-core's `build_regex_from_schema`). outlines-core builds
the automaton over the model's own characters (each a token); this module keeps only the states
reachable from the start that can still reach a complete match using those characters, so every
character the mask allows leads somewhere: a constrained generation never gets stuck, and a
constraint no string of the vocabulary can match is refused before any decoding.

outlines-core has no bound on the time or memory of a compile (`(a|b)*a(a|b){20}` takes millions of
states), so compiling runs in a child process (`python -m charlm.constraint`) with a timeout, a
limit on the address space it adds, and a cap on states. Results are cached per (constraint,
vocabulary). A `choice` is neither compiled in a child nor cached: see below.

A `choice` needs no library and no child: its automaton is the trie of the choices, built here. It
is not sampled character by character (masking renormalises at each step, which would weigh "R"
against "P" rather than "Rome" against "Paris" + "Parma"): charlm/choice.py draws one whole string
with the model's probability of each, and the row is then held to that one (`only`).

The engine (charlm/engine.py) masks a constrained row's logits with `allowed[state]` before sampling.
Ending: at a complete match that cannot grow, the generation stops. At a complete match that can
grow, it stops with the probability the model gives to the characters that would leave the language
(drawn from the request's own random stream; greedy: when its most likely character would leave).
"""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = ["Constraint", "ConstraintError", "CompiledConstraint", "compile_constraint"]

Kind = Literal["regex", "choice", "json"]

MAX_PATTERN_CHARS = 4096  # a regex, the choices together, or a JSON schema, as sent
MAX_CHOICES = 1024
MAX_CHOICE_CHARS = 512  # one choice: all are scored before the first character, as one prefill chunk costs
MAX_STATES = 20_000  # the table: states x vocabulary int32s (7.7 MB for 96 characters)
COMPILE_SECONDS = 3.0
# Address space the child may add to what it holds before compiling (numpy and the interpreter: about
# 100 MiB, more where libraries start a thread per core). Its resident set counts against the
# replica's 768 MiB beside the server's peak (benchmarks/memory.py); everything that compiles within
# COMPILE_SECONDS here needs well under this.
COMPILE_MEMORY = 192 << 20
# One thread for the child's numerical libraries: each thread a core would get reserves address space.
_CHILD_THREADS = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
CACHE_ENTRIES = 64


class ConstraintError(ValueError):
    """The constraint cannot be used; `field` names what to change."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message

    def param(self, name: str) -> str:
        """The field as a request names it, under the parameter `name` that holds the constraint
        (`constraint.regex`, `structured_outputs.choice`; the parameter itself for the whole of it)."""
        return name if self.field == "constraint" else f"{name}.{self.field}"


@dataclass(frozen=True)
class Constraint:
    """What a request asks the text to match, as sent (hashable: the cache's key)."""

    kind: Kind
    spec: str  # the regex; the choices as a JSON list; the schema as JSON

    @classmethod
    def of(cls, kind: Kind, value: Any) -> Constraint:
        """Check sizes before anything is compiled (the work stays bounded by what is checked here)."""
        if kind == "regex":
            if not isinstance(value, str) or not value:
                raise ConstraintError("regex", "must be a non-empty string")
            spec = value
        elif kind == "choice":
            if not isinstance(value, list) or not value or len(value) > MAX_CHOICES:
                raise ConstraintError("choice", f"must be a list of 1 to {MAX_CHOICES} strings")
            if not all(isinstance(c, str) and c for c in value):
                raise ConstraintError("choice", "every choice must be a non-empty string")
            if (longest := max(map(len, value))) > MAX_CHOICE_CHARS:
                raise ConstraintError("choice", f"each choice at most {MAX_CHOICE_CHARS} characters, got {longest}")
            spec = json.dumps(value, ensure_ascii=False)
        else:
            if not isinstance(value, dict):
                raise ConstraintError("json", "must be a JSON schema (an object)")
            spec = json.dumps(value, ensure_ascii=False, sort_keys=True)
        if len(spec) > MAX_PATTERN_CHARS:
            raise ConstraintError(kind, f"at most {MAX_PATTERN_CHARS} characters, got {len(spec)}")
        return cls(kind, spec)

    def regex(self) -> str:
        """The pattern outlines-core compiles (a regex, or a schema turned into one; not a choice)."""
        if self.kind == "regex":
            return self.spec
        from outlines_core import json_schema

        return str(json_schema.build_regex_from_schema(self.spec))


class CompiledConstraint:
    """The automaton as tables over the vocabulary: `next[s, c]` (-1: not allowed), `allowed[s]`,
    `accepting[s]` (a complete match), `grows[s]` (some character may follow). State 0 is the start.
    Every state is reachable and can reach a complete match. For a `choice`, `choices` holds each one
    the vocabulary can spell, as ids: the engine draws one (charlm/choice.py) and keeps to `only(k)`."""

    def __init__(self, constraint: Constraint, chars: tuple[str, ...], table: np.ndarray, accepting: np.ndarray,
                 choices: tuple[tuple[int, ...], ...] | None = None):
        self.constraint, self.chars = constraint, chars  # the vocabulary it was compiled for
        self.choices = choices
        self.next: np.ndarray = table
        self.allowed: np.ndarray = table >= 0
        self.accepting: np.ndarray = accepting
        self.grows: np.ndarray = np.asarray(self.allowed.any(axis=1))

    @property
    def states(self) -> int:
        return len(self.accepting)

    def state_after(self, ids: Sequence[int]) -> int:
        """The state these vocabulary ids lead to from the start; -1 where one is not allowed."""
        state = 0
        for i in ids:
            state = int(self.next[state, i])
            if state < 0:
                return -1
        return state

    def matches(self, ids: list[int]) -> bool:
        """Whether these vocabulary ids spell a complete match (what tests and callers check)."""
        state = self.state_after(ids)
        return state >= 0 and bool(self.accepting[state])

    def can_spell(self, ids: list[int]) -> bool:
        """Whether these ids can appear somewhere in a text that matches: from some state they all go
        through (every state is reachable, so that is enough). A stop string that cannot is refused."""
        states = np.arange(self.states)
        for i in ids:
            states = self.next[states, i]
            states = states[states >= 0]
            if not states.size:
                return False
        return True

    def only(self, k: int) -> CompiledConstraint:
        """The constraint to the k-th of `choices` alone: the row's text once that one is drawn."""
        assert self.choices is not None, "only a choice constraint has choices"
        ids = self.choices[k]
        text = "".join(self.chars[i] for i in ids)
        return CompiledConstraint(Constraint("choice", json.dumps([text], ensure_ascii=False)), self.chars,
                                  *_trie([ids], len(self.chars)), choices=(ids,))


def _trie(strings: list[tuple[int, ...]], size: int) -> tuple[np.ndarray, np.ndarray]:
    """The automaton of a finite set of id strings: a trie, state 0 its root."""
    table, accepting = [np.full(size, -1, np.int32)], [False]
    for ids in strings:
        state = 0
        for i in ids:
            if table[state][i] < 0:
                table[state][i] = len(table)
                table.append(np.full(size, -1, np.int32))
                accepting.append(False)
            state = int(table[state][i])
        accepting[state] = True
    return np.stack(table), np.array(accepting)


def _compile_choices(constraint: Constraint, chars: tuple[str, ...]) -> CompiledConstraint:
    """A choice's trie over the choices the vocabulary can spell (the others can never be picked);
    each choice once, in the order given."""
    ids = {c: i for i, c in enumerate(chars)}
    spelled = {tuple(ids[c] for c in text): None for text in json.loads(constraint.spec) if all(c in ids for c in text)}
    if not spelled:
        raise ConstraintError("constraint", "no text made of the model's characters can match it")
    strings = list(spelled)
    return CompiledConstraint(constraint, chars, *_trie(strings, len(chars)), choices=tuple(strings))


def _build(regex: str, chars: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, int]:
    """outlines-core's automaton over the vocabulary: (next, accepting, start) with all its states."""
    from outlines_core import Index, Vocabulary

    size = len(chars)
    tokens: dict[bytes, list[int]] = {c.encode(): [i] for i, c in enumerate(chars)}
    try:
        index = Index(regex, Vocabulary(size, tokens))
    except ValueError as exc:
        if "incompatible" not in str(exc):
            raise
        # some state has no exit over the vocabulary: build over every byte, prune below
        for b in range(256):
            tokens.setdefault(bytes([b]), [size + 1 + b])
        index = Index(regex, Vocabulary(size, tokens))
    transitions = index.get_transitions()
    if len(transitions) > MAX_STATES:
        raise ConstraintError("constraint", f"its automaton has {len(transitions)} states, over {MAX_STATES}: "
                              "simplify it (nested or large counted repetitions multiply states)")
    number = {s: k for k, s in enumerate(transitions)}
    table = np.full((len(transitions), size), -1, np.int32)
    for s, moves in transitions.items():
        for token, target in moves.items():
            if token < size:  # not the end-of-text token, nor a byte outside the vocabulary
                table[number[s], token] = number[target]
    accepting = np.zeros(len(transitions), bool)
    accepting[[number[s] for s in index.get_final_states() if s in number]] = True
    return table, accepting, number[index.get_initial_state()]


def _prune(table: np.ndarray, accepting: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the states reachable from `start` that can reach a complete match; renumber, start first."""
    live = accepting.copy()
    while True:
        grown = live | ((table >= 0) & live[np.maximum(table, 0)]).any(axis=1)
        if (grown == live).all():
            break
        live = grown
    if not live[start]:
        raise ConstraintError("constraint", "no text made of the model's characters can match it")
    table = np.where((table >= 0) & live[np.maximum(table, 0)], table, -1)
    seen, todo = {start}, [start]
    while todo:
        s = todo.pop()
        for t in table[s][table[s] >= 0].tolist():
            if t not in seen:
                seen.add(t)
                todo.append(t)
    keep = sorted(seen, key=lambda s: (s != start, s))
    remap = np.full(len(accepting) + 1, -1, np.int32)
    remap[keep] = np.arange(len(keep), dtype=np.int32)
    return remap[table[keep]], accepting[keep]


def _compile_here() -> int:
    """The child's side (`python -m charlm.constraint`): a request as JSON on stdin, the tables as
    .npz on stdout, or a refusal as JSON with exit status 2; its memory capped before any work."""
    limit = _address_space() + COMPILE_MEMORY
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    asked = json.loads(sys.stdin.buffer.read())
    constraint, chars = Constraint(asked["kind"], asked["spec"]), tuple(asked["chars"])
    try:
        table, accepting = _prune(*_build(constraint.regex(), chars))
    except ConstraintError as exc:
        return _refuse(exc.field, exc.message)
    except MemoryError:
        return _refuse("constraint", "compiling it needs more memory than allowed: simplify it")
    except Exception as exc:  # the library's refusal of the pattern (syntax, unsupported features)
        return _refuse(constraint.kind, f"does not compile: {str(exc)[:300]}")
    out = io.BytesIO()
    np.savez(out, table=table, accepting=accepting)
    sys.stdout.buffer.write(out.getvalue())
    return 0


def _address_space() -> int:
    """This process's virtual size now, in bytes (Linux's /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return 0


def _refuse(field: str, message: str) -> int:
    sys.stdout.write(json.dumps({"field": field, "message": message}))
    return 2


_cache: OrderedDict[tuple[Constraint, tuple[str, ...]], CompiledConstraint] = OrderedDict()
_lock = threading.Lock()
_compiling = threading.Lock()


def compile_constraint(constraint: Constraint, chars: tuple[str, ...]) -> CompiledConstraint:
    """The constraint's tables over the vocabulary `chars` (cached); ConstraintError names what is
    wrong, within COMPILE_SECONDS and COMPILE_MEMORY whatever the pattern (a child process does the
    work: outlines-core cannot be stopped from inside). Blocks: call it off the event loop."""
    if constraint.kind == "choice":  # bounded by Constraint.of's sizes: no child needed
        return _compile_choices(constraint, chars)
    key = (constraint, chars)
    with _compiling:  # one child at a time: concurrent requests cannot multiply its memory bound
        with _lock:
            if (hit := _cache.get(key)) is not None:
                _cache.move_to_end(key)
                return hit
        return _compile_in_child(constraint, chars, key)


def _compile_in_child(constraint: Constraint, chars: tuple[str, ...],
                      key: tuple[Constraint, tuple[str, ...]]) -> CompiledConstraint:
    asked = json.dumps({"kind": constraint.kind, "spec": constraint.spec, "chars": list(chars)}).encode()
    try:
        done = subprocess.run([sys.executable, "-m", "charlm.constraint"], input=asked, capture_output=True,
                              timeout=COMPILE_SECONDS, env={**os.environ, **_CHILD_THREADS})
    except subprocess.TimeoutExpired:
        raise ConstraintError(constraint.kind, f"did not compile within {COMPILE_SECONDS:g} s (its automaton grows "
                              "too large): simplify it") from None
    if done.returncode == 2:
        refusal = json.loads(done.stdout)
        raise ConstraintError(refusal["field"], refusal["message"])
    if done.returncode != 0:
        raise ConstraintError(constraint.kind, "compiling it needs more memory than allowed: simplify it")
    tables = np.load(io.BytesIO(done.stdout))
    compiled = CompiledConstraint(constraint, chars, tables["table"], tables["accepting"])
    with _lock:
        _cache[key] = compiled
        if len(_cache) > CACHE_ENTRIES:
            _cache.popitem(last=False)
    return compiled


if __name__ == "__main__":
    sys.exit(_compile_here())
