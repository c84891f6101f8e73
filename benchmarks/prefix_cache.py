"""Prefix cache: how much prefill the engine saves when text is sent again (charlm/prefix_cache.py).

Two figures, each against the same engine with the cache off, in the same run (native kernels, the
shipped model, a cache of the server's default size):
- a 10,000-character seed sent once (its first send: a true miss, a slice of the corpus no earlier
  request used), then sent again with the next 100 characters of the corpus after it: the second
  send's prefill against the first's (target >= 20x), and against the same second send with the
  cache off. Also where the second send's time to its first character goes besides prefill, and the
  same 10,000 characters resent exactly (the whole seed, with the logits after it, from the cache).
- a 20-turn conversation, each turn's seed the whole conversation so far plus 200 new characters of
  "user" text (slices of the corpus), answered with 100 generated characters that join the next
  turn's seed (fixed random seeds): total prefill over the 20 turns with the cache and without, and
  whether every turn generated the same text both ways (it must: a resumed state is the one an
  uncached run computes there, bit for bit).

Prefill is as the engine reports it (Timings.prefill_ms: the seed's chunks through nn.LSTM and the
first character sampled); time to first character (submission to the first character handed out)
is printed beside it, since it also counts what the engine does before the first chunk (encoding
the seed, hashing its prefixes, looking them up).
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import dataclass

import torch

from benchmarks.common import MODEL, corpus_text, cpu_info, median
from charlm.checkpoint import load_checkpoint
from charlm.engine import Engine
from charlm.files import file_sha256
from charlm.jobs import PREFILL_CHUNK, chunk_end
from charlm.prefix_cache import PrefixCache, prefix_digests
from charlm.request import EngineLimits, GenerationRequest, GenerationResult

SEED_CHARS, MORE_CHARS = 10_000, 100  # figure 1: the seed, and what the second send adds to it
TURNS, USER_CHARS, REPLY_CHARS = 20, 200, 100  # figure 2
CACHE_MB = 64  # CHARLM_PREFIX_CACHE_MB's default (app/settings.py)
# The second send is SEED_CHARS + MORE_CHARS long: over the default limit of 10,000 seed characters
# (EngineLimits, CHARLM_MAX_SEED_CHARS), so these engines allow it.
LIMITS = EngineLimits(max_seed_chars=SEED_CHARS + MORE_CHARS)


@dataclass
class Sent:
    result: GenerationResult
    prefill_ms: float  # as the engine reports it
    queue_ms: float  # as the engine reports it: submitted -> admitted
    first_char_ms: float  # submitted -> the first character handed out, measured on the handle


def send(engine: Engine, seed: str, length: int = 1, random_seed: int = 0) -> Sent:
    gen = engine.submit(GenerationRequest(seed, length=length, random_seed=random_seed))
    result = gen.result(120)
    first = ((gen.first_char_at or 0) - gen.submitted) * 1e3
    return Sent(result, result.timings.prefill_ms, result.timings.queue_ms, first)


def make_engine(ckpt, version: str, cache_mb: float, warm_up: str):  # type: ignore[no-untyped-def]
    """An engine with a prefix cache of `cache_mb` MiB (0: none), warmed on a 1,023-character seed
    (`warm_up`, which no measured text overlaps) so nn.LSTM has met every chunk length (512 and each
    power of two below) before anything is timed."""
    assert len(warm_up) == 2 * PREFILL_CHUNK - 1
    cache = PrefixCache(int(cache_mb * 2**20)) if cache_mb else None
    engine = Engine(ckpt.model, ckpt.vocab, LIMITS, cache=cache, version=version)
    send(engine, warm_up)
    return engine, cache


def chunks_after(start: int, end: int) -> list[int]:
    """The chunk lengths the engine runs for text [start, end) (charlm.jobs.chunk_end)."""
    out = []
    while start < end:
        nxt = chunk_end(start, end)
        out.append(nxt - start)
        start = nxt
    return out


def resent_seed(engine: Engine, cache: PrefixCache, text: str, offset: int) -> dict[str, float]:
    """One repeat of figure 1 on the cached engine, at `offset` in the corpus."""
    seed, longer = text[offset : offset + SEED_CHARS], text[offset : offset + SEED_CHARS + MORE_CHARS]
    saved = cache.stats.chars_saved
    first = send(engine, seed)
    assert cache.stats.chars_saved == saved, "the first send found a cached prefix: not a true miss"
    second = send(engine, longer)
    resumed = cache.stats.chars_saved - saved
    exact = send(engine, seed)  # the same seed again: all of it, and the logits after it, from the cache
    return {"first": first.prefill_ms, "first_ttfc": first.first_char_ms, "second": second.prefill_ms,
            "second_ttfc": second.first_char_ms, "second_queue": second.queue_ms, "resumed": resumed,
            "exact": exact.prefill_ms, "exact_ttfc": exact.first_char_ms, "char": second.result.generated}


Turns = tuple[list[float], list[float], list[str]]  # each turn's prefill (ms), time to first char (ms), text


def conversations(engines: tuple[Engine, Engine], text: str, offset: int) -> list[Turns]:
    """Figure 2 on each engine, turn by turn in lockstep (so a busier moment of the machine falls on
    both alike): for each engine, each turn's prefill (ms), time to first character (ms) and generated text."""
    talks = ["", ""]
    out: list[Turns] = [([], [], []), ([], [], [])]
    for turn in range(TURNS):
        user = text[offset + turn * USER_CHARS : offset + (turn + 1) * USER_CHARS]
        for i, engine in enumerate(engines):
            talks[i] += user
            s = send(engine, talks[i], length=REPLY_CHARS, random_seed=1000 + turn)
            out[i][0].append(s.prefill_ms)
            out[i][1].append(s.first_char_ms)
            out[i][2].append(s.result.generated)
            talks[i] += s.result.generated
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(MODEL))
    parser.add_argument("--repeats", type=int, default=5, help="first/second sends of figure 1 (default 5)")
    parser.add_argument("--conversations", type=int, default=1, help="20-turn conversations of figure 2 (default 1)")
    parser.add_argument("--quick", action="store_true", help="3 repeats of figure 1 (default 5)")
    parser.add_argument("--cache-mb", type=float, default=CACHE_MB)
    args = parser.parse_args()
    if args.cache_mb <= 0:
        parser.error("--cache-mb must be above 0: the cache off is measured in the same run anyway")
    if args.quick:
        args.repeats = 3
    ckpt = load_checkpoint(args.checkpoint)
    version = file_sha256(args.checkpoint)
    text = corpus_text()
    warm_up = text[: 2 * PREFILL_CHUNK - 1]
    cfg = ckpt.config
    # Figure 1's slices, then figure 2's, all apart from one another and from the warm-up text.
    spacing = SEED_CHARS + MORE_CHARS + 1_000
    conv_chars = TURNS * USER_CHARS
    needed = 2_000 + args.repeats * spacing + args.conversations * (conv_chars + 1_000)
    if len(text) < needed:
        raise SystemExit(f"the corpus has {len(text):,} characters; this run needs {needed:,}")
    offsets = [2_000 + i * spacing for i in range(args.repeats)]
    conv_offsets = [offsets[-1] + spacing + i * (conv_chars + 1_000) for i in range(args.conversations)]

    cached, cache = make_engine(ckpt, version, args.cache_mb, warm_up)
    uncached, _ = make_engine(ckpt, version, 0, warm_up)
    print(f"model {cfg.layers}x{cfg.hidden} (embed {cfg.embed}), {ckpt.model.num_parameters():,} parameters; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU {cpu_info('model name') or 'unknown'}; "
          f"native kernels "
          f"{'on' if cached.native else 'OFF'}; prefix cache {args.cache_mb:g} MiB")
    gc.freeze()  # as the service does once it is ready: no 100 ms full collections mid-run

    # --- figure 1 ---
    runs, off, same_char = [], [], True
    for offset in offsets:
        run = resent_seed(cached, cache, text, offset)
        without = send(uncached, text[offset : offset + SEED_CHARS + MORE_CHARS])
        run["off"], run["off_ttfc"] = without.prefill_ms, without.first_char_ms
        same_char &= without.result.generated == run["char"]
        runs.append(run)
        off.append(without.prefill_ms)

    def med(key: str) -> float:
        return median([r[key] for r in runs])

    def each(key: str) -> str:
        return " / ".join(f"{r[key]:,.1f}" for r in runs)

    first, second, without, n = med("first"), med("second"), med("off"), len(runs)
    longer = SEED_CHARS + MORE_CHARS
    print(f"10,000-char seed, first send (cache empty for it): prefill {first:,.1f} ms "
          f"({SEED_CHARS / first * 1e3:,.0f} chars/s); time to first char {med('first_ttfc'):,.1f} ms; "
          f"median of {n} ({each('first')} ms)")
    print(f"same seed + {MORE_CHARS} chars, second send, cache on: prefill {second:,.1f} ms = {first / second:.1f}x "
          f"faster than the first send (target >= 20x); time to first char {med('second_ttfc'):,.1f} ms = "
          f"{med('first_ttfc') / med('second_ttfc'):.1f}x; median of {n} ({each('second')} ms)")
    print(f"same seed + {MORE_CHARS} chars, cache off: prefill {without:,.1f} ms = {without / second:.1f}x the "
          f"cached second send; time to first char {med('off_ttfc'):,.1f} ms; median of {n} ({each('off')} ms); "
          f"same first character both ways in every repeat: {'yes' if same_char else 'NO'}")
    # Where the cached second send's time goes. The cache keeps states at multiples of PREFILL_CHUNK
    # (and at a seed's end, but only for that exact seed), so the longer seed resumes at the last
    # multiple inside the first and runs the rest, in the chunks an uncached run would use there.
    resumed = int(med("resumed"))
    rest = chunks_after(resumed, longer)
    hashing = []
    bounds = list(range(PREFILL_CHUNK, longer, PREFILL_CHUNK))
    lengths = sorted({*bounds, *(b + 1 for b in bounds), longer})
    for offset in offsets:
        started = time.perf_counter()
        prefix_digests(text[offset : offset + longer], lengths)
        hashing.append((time.perf_counter() - started) * 1e3)
    encoding = []
    for offset in offsets:
        started = time.perf_counter()
        ckpt.vocab.encode(text[offset : offset + longer])
        encoding.append((time.perf_counter() - started) * 1e3)
    other = med("second_ttfc") - med("second_queue") - second
    print(f"second send's {longer:,} chars: resumed at char {resumed:,} (the last chunk boundary both sends pass: "
          f"whole chunks of {PREFILL_CHUNK}, then halving pieces), ran {longer - resumed} chars in {len(rest)} "
          f"chunks ({' + '.join(map(str, rest))}) = "
          f"{(longer - resumed) / second * 1e3:,.0f} chars/s against the first send's "
          f"{SEED_CHARS / first * 1e3:,.0f}; its time to first char {med('second_ttfc'):,.1f} ms = queue "
          f"{med('second_queue'):,.2f} (encoding the seed included: {median(encoding):.2f} alone) + prefill "
          f"{second:,.1f} + {other:,.2f} outside both (hashing the seed's prefixes alone: {median(hashing):.2f})")
    print(f"same 10,000-char seed resent exactly: prefill {med('exact'):,.2f} ms (all of it from the cache) = "
          f"{first / med('exact'):,.0f}x faster than the first send; time to first char {med('exact_ttfc'):,.2f} ms")

    # --- figure 2 ---
    totals: list[tuple[float, float, float, float]] = []
    identical, turns_same, seed_chars, saved = True, 0, 0, 0
    for offset in conv_offsets:
        engine, conv_cache = make_engine(ckpt, version, args.cache_mb, warm_up)  # holding nothing of it yet
        before = conv_cache.stats.chars_saved
        (on, on_ttfc, on_text), (off_, off_ttfc, off_text) = conversations((engine, uncached), text, offset)
        saved = conv_cache.stats.chars_saved - before
        engine.close()
        seed_chars = sum(USER_CHARS * (t + 1) + sum(map(len, on_text[:t])) for t in range(TURNS))
        same = [a == b for a, b in zip(on_text, off_text)]
        turns_same, identical = sum(same), identical and all(same)
        totals.append((sum(on), sum(off_), sum(on_ttfc), sum(off_ttfc)))
    on_s, off_s = median([t[0] for t in totals]) / 1e3, median([t[1] for t in totals]) / 1e3
    on_ttfc_s, off_ttfc_s = median([t[2] for t in totals]) / 1e3, median([t[3] for t in totals]) / 1e3
    each_conv = " / ".join(f"{t[0] / 1e3:.2f} vs {t[1] / 1e3:.2f}" for t in totals)
    shown = f"; median of {len(totals)} conversations ({each_conv} s)" if len(totals) > 1 else ""
    print(f"{TURNS}-turn conversation ({USER_CHARS} new chars a turn + {REPLY_CHARS} generated, each turn resends "
          f"all before it: {seed_chars:,} seed chars in all, {saved:,} of them resumed from the cache): total prefill "
          f"cache on {on_s:.2f} s, cache off {off_s:.2f} s = {off_s / on_s:.1f}x; time to first char summed "
          f"{on_ttfc_s:.2f} s vs {off_ttfc_s:.2f} s = {off_ttfc_s / on_ttfc_s:.1f}x"
          f"{shown}")
    print(f"{TURNS}-turn conversation: generated text identical with and without the cache in every turn: "
          f"{'yes' if identical else f'NO ({turns_same} of {TURNS} turns in the last conversation)'}")
    st = cache.stats
    print(f"prefix cache after figure 1: {st.hits} hits, {st.misses} misses, {st.chars_saved:,} chars not run "
              f"again, {st.entries} entries, {st.bytes / 2**20:.1f} MiB")
    cached.close()
    uncached.close()


if __name__ == "__main__":
    main()
