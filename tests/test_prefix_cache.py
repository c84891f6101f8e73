"""The prefix cache (charlm/prefix_cache.py): text sent again resumes from a cached state, and what comes
out is bit for bit what an uncached run gives, on every decode path, for generation and scoring."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from charlm.checkpoint import Checkpoint
from charlm.engine import Engine
from charlm.jobs import PREFILL_CHUNK, chunk_bounds
from charlm.model import CharLSTM
from charlm.prefix_cache import PrefixCache
from charlm.request import EngineLimits, GenerationRequest, ScoreRequest, ScoreResult
from tests.conftest import make_corpus, make_other
from tests.test_engine import rss_bytes
from tests.test_models import settings, version_of

TEXT = make_corpus(400, seed=5)
LIMITS = EngineLimits(max_seed_chars=20_000, max_score_chars=20_000)


def engine(tiny: Checkpoint, cache: PrefixCache | None, native: bool = True, model: CharLSTM | None = None,
           version: str = "v1") -> Engine:
    return Engine(model or tiny.model, tiny.vocab, LIMITS, use_native=native, cache=cache, version=version)


def texts(e: Engine, seeds: list[str]) -> list[str]:
    return [e.generate(GenerationRequest(s, length=200, random_seed=i), timeout=120).text for i, s in enumerate(seeds)]


def scored(e: Engine, text: str, top_k: int) -> ScoreResult:
    return e.score(ScoreRequest(text, top_k)).result(timeout=120)


@pytest.mark.parametrize("native", [True, False], ids=["native kernels", "pytorch"])
def test_generation_resumed_from_the_cache_is_bit_exact(tiny: Checkpoint, native: bool) -> None:
    seed = TEXT[:5000]
    seeds = [seed, seed, seed + TEXT[5000:5100], seed[:4999] + ("e" if seed[4999] != "e" else "a")]
    cache = PrefixCache(64 * 2**20)
    with engine(tiny, None, native) as plain, engine(tiny, cache, native) as cached:
        assert texts(cached, seeds) == texts(plain, seeds)
    stats = cache.stats
    assert stats.misses == 1 and stats.hits == 3
    # the same seed again: all of it; +100 characters and a change in the 5,000th: the last chunk
    # boundary both pass (9 whole chunks, then pieces of 256 and 128 characters)
    boundary = 9 * PREFILL_CHUNK + 256 + 128
    assert chunk_bounds(5000)[-1] == boundary and boundary in chunk_bounds(5100)
    assert stats.chars_saved == 5000 + boundary + boundary


def test_a_seed_sharing_9999_characters_resumes_at_the_last_boundary(tiny: Checkpoint) -> None:
    """Resumed from 9,984: 19 whole chunks and a piece of 256, where both seeds' runs pass."""
    first = TEXT[:10_000]
    second = first[:9_999] + ("a" if first[9_999] != "a" else "e")
    cache = PrefixCache(64 * 2**20)
    with engine(tiny, None) as plain, engine(tiny, cache) as cached:
        assert texts(cached, [first, second]) == texts(plain, [first, second])
        result = cached.generate(GenerationRequest(second, length=10, random_seed=1), timeout=60)
    assert cache.stats.chars_saved == 9_984 + 10_000  # second: from 9,984; third: all of it
    assert result.timings.prefill_ms >= 0


@pytest.mark.parametrize("native", [True, False], ids=["native kernels", "pytorch"])
def test_scoring_a_growing_text_is_bit_exact_and_runs_only_the_new_part(tiny: Checkpoint, native: bool) -> None:
    cache = PrefixCache(64 * 2**20)
    with engine(tiny, None, native) as plain, engine(tiny, cache, native) as cached:
        for length, top_k in ((3000, 3), (4000, 3), (4000, 1), (4500, 5), (4600, 0)):
            got, want = scored(cached, TEXT[:length], top_k), scored(plain, TEXT[:length], top_k)
            assert got.per_char == want.per_char and got.logprob == want.logprob, (length, top_k)
    # 4,000 after 3,000: the five whole chunks scored before (2,560 characters); the same 4,000 with
    # fewer alternatives: all seven whole chunks; 4,500 with more alternatives than kept: nothing;
    # 4,600 without alternatives: the eight chunks kept with five.
    assert cache.stats.chars_saved == 2560 + 3584 + 4096


def test_two_models_never_share_states(tiny: Checkpoint) -> None:
    other = CharLSTM(tiny.model.config)
    other.load_state_dict({k: v * 0.8 for k, v in tiny.model.state_dict().items()})
    seed = TEXT[:3000]
    cache = PrefixCache(64 * 2**20)
    with engine(tiny, cache, version="a") as a, engine(tiny, cache, model=other, version="b") as b, \
            engine(tiny, None, model=other) as b_alone:
        texts(a, [seed])
        assert texts(b, [seed]) == texts(b_alone, [seed])
    assert cache.stats.hits == 0 and cache.stats.misses == 2


def test_the_cache_stays_within_its_bound_under_200_long_seeds(tiny: Checkpoint) -> None:
    bound = 2 * 2**20
    cache = PrefixCache(bound)
    seeds = [make_corpus(60, seed=100 + i)[:3000] for i in range(200)]
    with engine(tiny, cache) as e:
        texts(e, seeds[:20])  # allocator warm-up
        before = rss_bytes()
        for start in range(20, 200, 20):
            texts(e, seeds[start : start + 20])
            assert cache.stats.bytes <= bound
        grown = rss_bytes() - before
    assert cache.stats.entries < 200 * (len(chunk_bounds(3000)) + 1)  # entries were evicted
    assert grown < bound + 16 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB"


def test_the_service_caches_per_model_version_and_forgets_a_replaced_one(tmp_path: Path, models_dir: Path,
                                                                        tiny: Checkpoint) -> None:
    seed = TEXT[:3000]
    body = {"seed": seed, "length": 100, "random_seed": 3, "model": "a"}
    with TestClient(create_app(settings(models_dir, admin_key="k", max_seed_chars=20_000))) as c:
        first = c.post("/generate", json=body).json()
        assert c.post("/generate", json=body).json()["text"] == first["text"]
        metrics = c.get("/metrics").text
        assert "charlm_prefix_cache_hits_total 1.0" in metrics and "charlm_prefix_cache_misses_total 1.0" in metrics
        new = make_other(tiny, models_dir / ".a.tmp", scale=1.1)
        os.replace(new, models_dir / "a.safetensors")
        assert c.post("/admin/models/a/reload", headers={"Authorization": "Bearer k"}).json()["changed"]
        reloaded = c.post("/generate", json=body).json()
        assert reloaded["model_version"] == version_of(models_dir / "a.safetensors")
        with engine(tiny, None, model=make_model(models_dir / "a.safetensors")) as alone:
            assert reloaded["text"] == alone.generate(GenerationRequest(seed, length=100, random_seed=3)).text
        assert "charlm_prefix_cache_misses_total 2.0" in c.get("/metrics").text


def make_model(path: Path) -> CharLSTM:
    from charlm.checkpoint import load_checkpoint

    return load_checkpoint(path).model


def test_no_cache_when_its_size_is_zero(models_dir: Path) -> None:
    with TestClient(create_app(settings(models_dir, prefix_cache_mb=0))) as c:
        assert c.app.state.models.cache is None  # type: ignore[attr-defined]
        assert "charlm_prefix_cache" not in c.get("/metrics").text


