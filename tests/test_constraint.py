"""Structured output: a regex, a choice or a JSON schema compiled over the model's characters, and
generation that matches it exactly; what cannot be compiled, or matched, refused before any decoding."""

from __future__ import annotations

import collections
import json
import math
import re
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from charlm.checkpoint import Checkpoint
from charlm.choice import choice_logprobs, draw_choice
from charlm.constraint import Constraint, ConstraintError, compile_constraint
from charlm.engine import Engine, EngineHooks
from charlm.handles import Generation
from charlm.model import CharLSTM, ModelConfig
from charlm.request import EngineLimits, GenerationRequest, ScoreRequest
from charlm.sampling import SamplingParams
from charlm.vocab import Vocab
from tests.conftest import WORDS
from tests.server import running_server

LIMITS = EngineLimits(max_batch=64, max_queue=256)
ASCII = tuple(sorted({chr(c) for c in range(32, 127)} | {"\n"}))
SENTENCE = r"[A-Z][a-z]+ (is|was) [a-z]+\."


def test_each_kind_compiles_to_a_table_over_the_vocabulary() -> None:
    regex = compile_constraint(Constraint.of("regex", r"[A-Z][a-z]+ [0-9]{4}"), ASCII)
    ids = {c: i for i, c in enumerate(ASCII)}
    assert regex.matches([ids[c] for c in "Paris 2024"]) and not regex.matches([ids[c] for c in "Paris 202"])
    assert int(regex.allowed[0].sum()) == 26  # the first character: a capital
    choice = compile_constraint(Constraint.of("choice", ["yes", "no", "a.b"]), ASCII)
    assert [c for c in ASCII if choice.allowed[0, ids[c]]] == ["a", "n", "y"]
    assert choice.matches([ids[c] for c in "a.b"]) and not choice.matches([ids[c] for c in "axb"])
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    as_json = compile_constraint(Constraint.of("json", schema), ASCII)
    assert as_json.matches([ids[c] for c in '{"age":42}']) and not as_json.matches([ids[c] for c in '{"age":"x"}'])


@pytest.mark.parametrize("kind, value, field, message", [
    ("regex", "[é]+", "constraint", "no text made of the model's characters can match it"),
    ("regex", "(", "regex", "does not compile"),
    ("regex", "a(?=b)", "regex", "does not compile"),
    ("regex", "(a|b)*a(a|b){20}", "regex", "simplify it"),  # an automaton of millions of states
    ("regex", "((a{1,50}){1,50}){1,50}", "regex", "simplify it"),
    ("regex", "a" * 5000, "regex", "at most 4096 characters"),
    ("choice", ["yes", ""], "choice", "non-empty"),
    ("choice", ["x"] * 100_000, "choice", "1 to 1024 strings"),
    ("choice", [], "choice", "1 to 1024 strings"),
    ("choice", ["yes", "n" * 513], "choice", "at most 512 characters, got 513"),
    ("json", "not a schema", "json", "JSON schema"),
])
def test_what_cannot_be_used_is_refused_naming_the_field(kind: str, value: object, field: str, message: str) -> None:
    with pytest.raises(ConstraintError) as info:
        compile_constraint(Constraint.of(kind, value), ASCII)  # type: ignore[arg-type]
    assert info.value.field == field and message in info.value.message, info.value


def test_exponential_blowups_are_fine_where_the_automaton_is_small() -> None:
    assert compile_constraint(Constraint.of("regex", "(a|aa)*b"), ASCII).states <= 4
    recursive = {"$defs": {"n": {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"}
    assert compile_constraint(Constraint.of("json", recursive), ASCII).states > 0  # bounded by the library's depth


def test_every_output_over_200_seeds_matches_and_says_how_it_ended(tiny: Checkpoint) -> None:
    sentence = compile_constraint(Constraint.of("regex", SENTENCE), tiny.vocab.chars)
    names = compile_constraint(Constraint.of("choice", ["Tom", "Sara", "the boat"]), tiny.vocab.chars)
    with Engine(tiny.model, tiny.vocab, LIMITS) as engine:
        for constraint, pattern in ((sentence, SENTENCE), (names, "Tom|Sara|the boat")):
            gens = engine.submit_many([GenerationRequest("The ", length=200, random_seed=s, constraint=constraint,
                                                         sampling=SamplingParams(scale_factor=0.7))
                                       for s in range(200)])
            results = [g.result(timeout=300) for g in gens]
            assert all(r.finish_reason == "stop" for r in results)
            assert all(re.fullmatch(pattern, r.generated) for r in results), [r.generated for r in results][:5]
        cut = engine.generate(GenerationRequest("The ", length=2, random_seed=1, constraint=sentence), timeout=60)
        alone = engine.generate(GenerationRequest("The ", length=200, random_seed=7, constraint=sentence), timeout=60)
        crowd = engine.submit_many([GenerationRequest("The ", length=200, random_seed=7, constraint=sentence)]
                                   + [GenerationRequest("A", length=100, random_seed=s) for s in range(6)])
        assert crowd[0].result(timeout=60).generated == alone.generated  # batch-independent, as ever
    assert cut.finish_reason == "length" and len(cut.generated) == 2  # a match cut short says so


def test_a_greedy_constrained_row_and_a_masked_top_character(tiny: Checkpoint) -> None:
    letters = compile_constraint(Constraint.of("regex", "[a-z]{5}"), tiny.vocab.chars)
    with Engine(tiny.model, tiny.vocab, LIMITS) as engine:
        result = engine.generate(GenerationRequest("The boat", length=50, constraint=letters,
                                                   sampling=SamplingParams(greedy=True, top_k=1)), timeout=60)
    # after "The boat" the model's top character is a space or punctuation: masked first, then top_k 1
    assert re.fullmatch("[a-z]{5}", result.generated) and result.finish_reason == "stop"


def test_the_routes_take_structured_outputs(tiny_checkpoint_path: Path, tiny: Checkpoint) -> None:
    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint_path, device="cpu"))) as c:
        body = {"seed": "The ", "length": 100, "random_seed": 3, "constraint": {"regex": SENTENCE}}
        r = c.post("/generate", json=body)
        assert r.status_code == 200 and re.fullmatch(SENTENCE, r.json()["generated"]), r.text
        for constraint, field in (({"regex": "("}, "constraint.regex"), ({"regex": "[é]+"}, "constraint"),
                                  ({"regex": "a", "choice": ["b"]}, "constraint"),
                                  ({"choice": ["a", ""]}, "constraint.choice")):
            r = c.post("/generate", json={**body, "constraint": constraint})
            assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == field, r.text
    with running_server(tiny_checkpoint_path) as server:
        import openai

        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        out = client.completions.create(model=model, prompt="The ", max_tokens=100, seed=5, n=4,
                                        extra_body={"structured_outputs": {"choice": ["Tom", "Sara"]}})
        assert {c.text for c in out.choices} <= {"Tom", "Sara"} and {c.finish_reason for c in out.choices} == {"stop"}
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=model, prompt="The ", max_tokens=10,
                                      extra_body={"structured_outputs": {"regex": "(a|b)*a(a|b){20}"}})
        assert "structured_outputs.regex" in str(info.value)


def test_a_vocabulary_without_json_characters_cannot_take_a_schema(tiny: Checkpoint) -> None:
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}}
    with pytest.raises(ConstraintError, match="no text made of the model's characters"):
        compile_constraint(Constraint.of("json", schema), tiny.vocab.chars)
    model = CharLSTM(ModelConfig(vocab_size=len(ASCII), embed=8, hidden=16, layers=1))  # untrained: any text
    vocab = Vocab(ASCII)
    constraint = compile_constraint(Constraint.of("json", schema), ASCII)
    with Engine(model, vocab, LIMITS) as engine:
        results = [engine.generate(GenerationRequest("{", length=300, random_seed=s, constraint=constraint))
                   for s in range(20)]
    ended = [r.generated for r in results if r.finish_reason == "stop"]
    assert ended and all(isinstance(json.loads(text), dict) for text in ended)
    for result in results:  # cut by length or not, what there is is a prefix of a match
        assert constraint.matches([ASCII.index(c) for c in result.generated]) == (result.finish_reason == "stop")


def test_compiles_run_one_child_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each child may use up to COMPILE_MEMORY: requests compiling at once must not multiply it."""
    import subprocess
    import threading

    from charlm import constraint as module

    running, most, lock = 0, 0, threading.Lock()
    real = subprocess.run

    def counted(*args: object, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            return real(*args, **kwargs)  # type: ignore[call-overload]
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(module.subprocess, "run", counted)
    threads = [threading.Thread(target=compile_constraint, args=(Constraint.of("regex", f"[a-c]{{{n}}}x"), ASCII))
               for n in range(2, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == 1


CHOICES = ["the shore", "the sailor", "the boy", "wood"]  # three share "the ": masking per step would favour them


def test_choice_frequencies_follow_the_models_probabilities_from_score(tiny_checkpoint_path: Path) -> None:
    """Over 400 draws by the openai SDK, each choice comes about as often as /score's probability of it,
    normalised over the choices (per-character masking picked "the shore" 46 % of the time where its
    probability is 67 %)."""
    import httpx
    import openai

    seed, calls, n = "Along ", 8, 50
    with running_server(tiny_checkpoint_path) as server:
        def logprob(text: str) -> float:
            r = httpx.post(f"{server.url}/score", json={"text": text, "per_char": False}, timeout=60)
            assert r.status_code == 200, r.text
            return float(r.json()["logprob"])

        weights = [math.exp(logprob(seed + choice) - logprob(seed)) for choice in CHOICES]
        expected = [w / sum(weights) for w in weights]
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        counts: collections.Counter[str] = collections.Counter()
        for s in range(calls):
            out = client.completions.create(model=model, prompt=seed, max_tokens=20, n=n, seed=s,
                                            extra_body={"structured_outputs": {"choice": CHOICES}})
            assert {c.finish_reason for c in out.choices} == {"stop"}
            counts.update(c.text for c in out.choices)
        greedy = client.completions.create(model=model, prompt=seed, max_tokens=20, temperature=0,
                                           extra_body={"structured_outputs": {"choice": CHOICES}})
    draws = calls * n
    assert set(counts) <= set(CHOICES) and sum(counts.values()) == draws
    for choice, p in zip(CHOICES, expected):  # within 4 standard errors of a binomial
        assert abs(counts[choice] / draws - p) <= 4 * math.sqrt(p * (1 - p) / draws) + 1 / draws, (counts, expected)
    assert greedy.choices[0].text == CHOICES[expected.index(max(expected))]


def test_choice_scores_are_the_models_and_take_the_bias_and_scale(tiny: Checkpoint) -> None:
    """Each choice's score is /score's log-probability of it after the seed; with a bias and a scale,
    the sum of what the sampler's distribution gives its characters; a choice another extends ("w"
    beside "wood") also counts the probability of a character that continues neither."""
    seed, texts = "Along ", [*CHOICES, "w"]
    with torch.inference_mode():
        logits, (h, c), _ = tiny.model(tiny.vocab.encode(seed)[None])
    constraint = compile_constraint(Constraint.of("choice", texts), tiny.vocab.chars)

    def scores(bias: torch.Tensor | None = None, scale: float = 1.0) -> list[float]:
        return choice_logprobs(tiny.model, (h[:, 0], c[:, 0]), logits[0, -1], constraint, bias, scale).tolist()

    def reference(text: str, bias: torch.Tensor, scale: float) -> float:
        """The same sum, the plain way: the model over seed + text, each position's distribution."""
        with torch.inference_mode():
            z, _, _ = tiny.model(tiny.vocab.encode(seed + text)[None])
        lp = torch.log_softmax((z[0].float() + bias).double() * scale, dim=-1)
        ids = tiny.vocab.encode(seed + text).tolist()
        return sum(float(lp[t - 1, ids[t]]) for t in range(len(seed), len(ids)))

    plain = scores()
    with Engine(tiny.model, tiny.vocab, LIMITS) as engine:
        for k, text in enumerate(CHOICES):
            scored = engine.score(ScoreRequest(seed + text)).result(timeout=60)
            assert plain[k] == pytest.approx(sum(e.logprob or 0.0 for e in scored.per_char[len(seed):]), abs=1e-4)
        after_w = engine.score(ScoreRequest(seed + "wo")).result(timeout=60).per_char
    p_o = math.exp(after_w[-1].logprob or 0.0)  # "o" is the only character that continues "w" (into "wood")
    assert plain[4] == pytest.approx((after_w[-2].logprob or 0.0) + math.log1p(-p_o), abs=1e-4)
    bias = torch.zeros(len(tiny.vocab))
    bias[tiny.vocab.chars.index("h")] = -3.0
    bias[tiny.vocab.chars.index("s")] = 2.0
    steered = scores(bias, 0.7)
    for k, text in enumerate(CHOICES):
        assert steered[k] == pytest.approx(reference(text, bias, 0.7), abs=1e-4)
    assert draw_choice(torch.tensor(plain), greedy=True, uniform=0.99) == max(range(5), key=plain.__getitem__)
    assert draw_choice(torch.tensor([float("-inf"), 0.0]), greedy=False, uniform=0.0) == 1  # never the impossible


def test_a_choice_that_another_extends_ends_by_the_models_odds(tiny: Checkpoint) -> None:
    """Among "th", "the" and "the s", "th" is drawn with the probability that the model writes "th" and
    then anything but "e" (about 10 % here), not with all of its probability of writing "th" (which
    would make it about half the draws)."""
    seed, texts, draws = "Along ", ["th", "the", "the s"], 250
    constraint = compile_constraint(Constraint.of("choice", texts), tiny.vocab.chars)
    with Engine(tiny.model, tiny.vocab, LIMITS) as engine:
        def prob(text: str) -> float:
            per_char = engine.score(ScoreRequest(seed + text)).result(timeout=60).per_char
            return math.exp(sum(e.logprob or 0.0 for e in per_char[len(seed):]))

        # each ends with the probability of a character that continues no choice: not "e", not " "
        weights = [prob("th") - prob("the"), prob("the") - prob("the "), prob("the s")]
        drawn = collections.Counter(g.result(timeout=120).generated for g in engine.submit_many(
            [GenerationRequest(seed, length=20, random_seed=s, constraint=constraint) for s in range(draws)]))
    assert set(drawn) <= set(texts) and sum(drawn.values()) == draws
    for text, weight in zip(texts, weights):
        p = weight / sum(weights)
        assert abs(drawn[text] / draws - p) <= 4 * math.sqrt(p * (1 - p) / draws) + 1 / draws, (drawn, weights)


def test_a_banned_character_rules_out_the_choices_that_hold_it(tiny_checkpoint_path: Path, tiny: Checkpoint) -> None:
    w = tiny.vocab.chars.index("w")
    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint_path, device="cpu"))) as c:
        model = c.get("/v1/models").json()["data"][0]["id"]
        texts = set()
        for s in range(40):
            body = {"model": model, "prompt": "Along ", "max_tokens": 20, "seed": s, "logit_bias": {str(w): -100}}
            r = c.post("/v1/completions", json={**body, "structured_outputs": {"choice": CHOICES}})
            assert r.status_code == 200, r.text
            texts.add(r.json()["choices"][0]["text"])
    assert texts and texts <= set(CHOICES) - {"wood"}


def test_a_stop_string_the_constraint_can_never_produce_is_refused(tiny_checkpoint_path: Path) -> None:
    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint_path, device="cpu"))) as c:
        body = {"seed": "The ", "length": 50, "random_seed": 1, "constraint": {"regex": "[a-z]+ [a-z]+"}}
        for stop in (["e b", "x"],  # "x" is not in the vocabulary
                     ["."], ["  "], ["T"], ["boy", "."]):
            r = c.post("/generate", json={**body, "stop": stop})
            assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "stop", (stop, r.text)
            assert "can never appear" in r.text
        fine = c.post("/generate", json={**body, "stop": ["e b", " "]})
        model = c.get("/v1/models").json()["data"][0]["id"]
        assert fine.status_code == 200 and " " not in fine.json()["generated"], fine.text  # stopped at the space
        r = c.post("/v1/completions", json={"model": model, "prompt": "The ", "max_tokens": 9, "stop": "sand",
                                             "structured_outputs": {"choice": ["the boy", "wood"]}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text
        r = c.post("/v1/completions", json={"model": model, "prompt": "The ", "max_tokens": 9,
                                             "structured_outputs": {"grammar": "root ::= \"a\""}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "structured_outputs.grammar", r.text
        assert "regex, choice or json" in r.text


def test_huge_patterns_and_choice_lists_are_refused_at_the_door(tiny_checkpoint_path: Path) -> None:
    """A 1 MB pattern never reaches the parser (the body limit); one that fits the body is refused by
    size, naming the field, before anything is compiled."""
    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint_path, device="cpu"))) as c:
        model = c.get("/v1/models").json()["data"][0]["id"]
        megabyte = {"regex": "a" * 10**6}
        r = c.post("/v1/completions", json={"model": model, "prompt": "The ", "structured_outputs": megabyte})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text[:300]
        for outputs, param in (({"regex": "a" * 60_000}, "structured_outputs.regex"),
                               ({"choice": ["the"] * 10_000}, "structured_outputs.choice"),
                               ({"json": {"enum": ["a" * 60_000]}}, "structured_outputs.json")):
            r = c.post("/v1/completions", json={"model": model, "prompt": "The ", "structured_outputs": outputs})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text[:300]
            r = c.post("/generate", json={"seed": "The ", "constraint": outputs})
            assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == param.replace(
                "structured_outputs", "constraint"), r.text[:300]


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "torch"])
def test_both_decode_paths_keep_constraints_alone_or_in_a_crowd(tiny: Checkpoint, use_native: bool) -> None:
    sentence = compile_constraint(Constraint.of("regex", SENTENCE), tiny.vocab.chars)
    names = compile_constraint(Constraint.of("choice", CHOICES), tiny.vocab.chars)
    requests = [GenerationRequest("Along ", length=100, random_seed=s, constraint=constraint)
                for s in range(10) for constraint in (sentence, names)]
    with Engine(tiny.model, tiny.vocab, LIMITS, use_native=use_native) as engine:
        assert engine.native == use_native
        alone = [engine.generate(r, timeout=60).generated for r in requests]
        crowd = engine.submit_many([*requests, *(GenerationRequest("The", length=80, random_seed=s) for s in range(8))])
        together = [g.result(timeout=120).generated for g in crowd[: len(requests)]]
    assert together == alone
    assert all(re.fullmatch(SENTENCE, t) for t in alone[::2]) and set(alone[1::2]) <= set(CHOICES)
    assert len(set(alone[1::2])) > 1  # the seeds draw different choices


def test_a_compile_child_that_starts_large_still_compiles() -> None:
    """The child's limit is address space it may add: one that already holds much (a thread per core
    of a large machine reserves tens of MiB each) compiles as a small one does."""
    import subprocess
    import sys

    code = ("import mmap, sys; pad = mmap.mmap(-1, 1 << 30); from charlm.constraint import _compile_here; "
            "sys.exit(_compile_here())")
    asked = json.dumps({"kind": "regex", "spec": "[a-z]{3}", "chars": list(ASCII)}).encode()
    done = subprocess.run([sys.executable, "-c", code], input=asked, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stdout[:300] + done.stderr[-300:]


def test_choices_drawn_together_keep_their_own_settings(tiny: Checkpoint) -> None:
    """One seed, one list, in one batch: top_k 1 takes the likeliest, a bias that bans "t" leaves only
    "wood", and each gives the same text again once its scores are kept."""
    constraint = compile_constraint(Constraint.of("choice", CHOICES), tiny.vocab.chars)
    ban_t = SamplingParams(logit_bias=((tiny.vocab.chars.index("t"), -100.0),))
    requests = [GenerationRequest("Along ", length=20, random_seed=s, constraint=constraint, sampling=p)
                for s in range(4) for p in (SamplingParams(top_k=1), ban_t, SamplingParams())]
    with Engine(tiny.model, tiny.vocab, LIMITS) as engine:
        first = [g.result(timeout=60).generated for g in engine.submit_many(requests)]
        again = [g.result(timeout=60).generated for g in engine.submit_many(requests)]
    assert first == again
    assert set(first[0::3]) == {"the shore"} and set(first[1::3]) == {"wood"}  # the likeliest; the one left
    assert len(set(first[2::3])) > 1


def test_scoring_choices_is_interleaved_with_decode_steps(tiny: Checkpoint) -> None:
    """Scoring 3,500 characters of choices is several prefill chunks of work: requests that each bring
    that much start one per loop turn, with a decode step of the running request between them."""
    words = "".join(ch for ch in " ".join(WORDS) + " " if ch in tiny.vocab.chars)  # the tiny vocabulary's
    long_choices = [(words * 8)[k : k + 500] for k in range(7)]
    constraint = compile_constraint(Constraint.of("choice", long_choices), tiny.vocab.chars)
    events: list[str] = []

    def started(gen: Generation, index: int) -> None:
        if index == 0 and gen.request.constraint is not None:
            events.append("start")

    hooks = EngineHooks(before_step=lambda: events.append("step"), on_char=started)
    with Engine(tiny.model, tiny.vocab, LIMITS, hooks=hooks) as engine:
        running = engine.submit(GenerationRequest("The ", length=2000, random_seed=1))
        while "step" not in events:
            time.sleep(0.001)  # waits for the worker, whatever its pace: nothing is raced
        gens = engine.submit_many([GenerationRequest("The ", length=600, random_seed=s, constraint=constraint,
                                                     sampling=SamplingParams(scale_factor=1.0 + s / 10))
                                   for s in range(4)])
        assert {g.result(timeout=300).generated for g in gens} <= set(long_choices)
        running.cancel()
    starts = [i for i, e in enumerate(events) if e == "start"]
    assert len(starts) == 4 and all("step" in events[a:b] for a, b in zip(starts, starts[1:])), events[starts[0]:]
