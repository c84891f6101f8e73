"""A prepared GPU check: one command that, on a machine with CUDA, in under 8 minutes, runs the CUDA tests,
trains for a minute, measures aggregate decode at large batches, and writes one JSON report.

    python scripts/gpu_check.py --out gpu-check.json          # or: make gpu-check
    PYTHONPATH=. python scripts/gpu_check.py --out r.json     # from the repo root, without installing

Sections, each with its own time budget, each recording its figures, elapsed seconds and any error (a section
that fails does not stop the next):

  tests   `pytest tests/test_cuda.py -q` in a subprocess: passed / failed / errors / skipped and the exit code
  train   training for --train-seconds on --corpus (into a temporary directory): chars/s and held-out bpc
  decode  aggregate decode chars/s at each of --batches (B requests of --decode-length characters submitted
          at once to an Engine with max_batch=B), the median of --repeats runs, for the shipped model and for
          the one just trained

Without CUDA it refuses (exit 2, one line naming the cause) unless --allow-cpu is given: then it is a dry run
on the CPU, with a tiny training model, to test this script itself. A watchdog writes the report and exits 3
if the whole run passes --deadline seconds. Exit 0: every section that ran is ok; 1: one is not.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python scripts/gpu_check.py`, charlm installed or not
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

DEFAULT_CORPUS = ROOT / "data" / "mysterious_island.txt"
DEFAULT_MODEL = ROOT / "models" / "mysterious_island.safetensors"
DECODE_SEED = "The island"
# On the CPU (--allow-cpu) training uses a tiny model unless sizes are given: the dry run tests the script.
TINY = {"embed": 16, "hidden": 64, "layers": 1, "batch_size": 8, "seq_len": 64}


def _batches(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected batch sizes >= 1, got {text!r}")
    return values


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="where to write the JSON report")
    p.add_argument("--train-seconds", type=_positive(float), default=60.0, help="training time (default: 60)")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="training text (default: %(default)s)")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="shipped model to decode with "
                                                                      "(default: %(default)s)")
    p.add_argument("--batches", type=_batches, default=[256, 1024], help="decode batch sizes, comma-separated "
                                                                         "(default: 256,1024)")
    p.add_argument("--decode-length", type=_positive(int), default=200, help="characters per request (default: 200)")
    p.add_argument("--repeats", type=_positive(int), default=3, help="timed decode runs per batch; the median "
                                                                     "is reported (default: 3)")
    p.add_argument("--no-tests", action="store_true", help="skip the pytest section")
    p.add_argument("--allow-cpu", action="store_true", help="without CUDA, run on the CPU (a dry run of this "
                                                            "script, tiny training model) instead of refusing")
    for name in ("embed", "hidden", "layers", "batch_size", "seq_len"):
        p.add_argument("--train-" + name.replace("_", "-"), dest="train_" + name, type=_positive(int),
                       help=f"training {name} (default: TrainConfig's on CUDA, {TINY[name]} on the CPU)")
    p.add_argument("--tests-timeout", type=_positive(float), default=180.0, help="seconds (default: 180)")
    p.add_argument("--decode-budget", type=_positive(float), default=150.0,
                   help="seconds for the whole decode section; runs that would start later are skipped "
                        "(default: 150)")
    p.add_argument("--deadline", type=_positive(float), default=470.0,
                   help="the watchdog: past this many seconds the report is written as it stands and the script "
                        "exits 3 (default: 470, under 8 minutes)")
    return p.parse_args(argv)


def cuda_refusal() -> str | None:
    """Why CUDA cannot be used here, in one line; None when it can."""
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return (f"CUDA is not available: torch {torch.__version__} is a CPU-only build; run this on a machine "
                "with a CUDA GPU and a CUDA build of torch, or pass --allow-cpu for a dry run on the CPU")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
    return (f"CUDA is not available: torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees no "
            f"usable GPU{where}; check the driver with nvidia-smi, or pass --allow-cpu for a dry run on the CPU")


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=torch.cuda.get_device_name(device), capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), device_count=torch.cuda.device_count(),
                    bf16=torch.cuda.is_bf16_supported())
    else:
        info["device_name"] = platform.processor() or platform.machine()
    try:
        from charlm import __version__

        info["charlm"] = __version__
    except Exception as exc:  # the report says so; the sections will fail on their own
        info["charlm"] = f"import failed: {exc}"
    return info


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                               timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def _error(exc: BaseException) -> dict[str, Any]:
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500], "traceback": "".join(lines)[-3000:]}


class Report:
    """The report as it stands, written atomically after every section (and by the watchdog)."""

    def __init__(self, path: Path, started: float, meta: dict[str, Any]):
        self.path, self.started = path, started
        self.lock = threading.Lock()
        self.data: dict[str, Any] = {"ok": False, **meta, "sections": {}}
        self.current: str | None = None
        self.child: subprocess.Popen[str] | None = None  # the pytest run, for the watchdog to stop
        self.workdir: Path | None = None  # the temporary directory, for the watchdog to remove

    def section(self, name: str, budget_s: float, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        with self.lock:
            self.current = name
        start = time.perf_counter()
        try:
            result = fn()
        except Exception as exc:
            result = {"ok": False, **_error(exc)}
        elapsed = time.perf_counter() - start
        result = {"ok": bool(result.get("ok")), "elapsed_s": round(elapsed, 2), "budget_s": round(budget_s, 1),
                  "over_budget": elapsed > budget_s, **{k: v for k, v in result.items() if k != "ok"}}
        with self.lock:
            self.data["sections"][name] = result
            self.current = None
            self._write()
        mark = "ok" if result["ok"] else "FAILED"
        print(f"gpu_check: {name}: {mark} in {elapsed:.1f} s{_brief(name, result)}", file=sys.stderr, flush=True)
        return result

    def finish(self, aborted: str | None = None) -> bool:
        """Set the overall figures and write; the caller holds the lock."""
        sections = self.data["sections"]
        self.data["elapsed_s"] = round(time.perf_counter() - self.started, 2)
        self.data["ok"] = aborted is None and bool(sections) and all(s["ok"] for s in sections.values())
        if aborted:
            self.data["aborted"] = aborted
        self._write()
        return bool(self.data["ok"])

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)


def _brief(name: str, s: dict[str, Any]) -> str:
    if "error" in s:
        return f": {s['error']}"
    if name == "tests" and "passed" in s:
        return f": {s['passed']} passed, {s['failed']} failed, {s['errors']} errors, {s['skipped']} skipped"
    if name == "train" and "chars_per_s" in s:
        return f": {s['chars_per_s']:,.0f} chars/s, held-out {s['final_val_bpc']:.3f} bpc"
    if name == "decode":
        parts = [f"{m} B={b} {r['chars_per_s']:,.0f} chars/s" for m, figures in s.get("models", {}).items()
                 for b, r in figures.get("batches", {}).items() if "chars_per_s" in r]
        return ": " + "; ".join(parts) if parts else ""
    return ""


# --- tests ---
def run_tests(report: Report, device: torch.device, timeout: float, workdir: Path) -> dict[str, Any]:
    junit = workdir / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "tests/test_cuda.py", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # its own process group: a timeout stops all of it
    report.child = child
    timed_out = False
    try:
        output, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(child)
        output, _ = child.communicate()
    finally:
        report.child = None
    result: dict[str, Any] = {"command": "python " + " ".join(cmd[1:5]), "exit_code": child.returncode,
                              "timed_out": timed_out, "output_tail": output[-4000:]}
    if junit.exists():
        result.update(_junit_counts(junit))
    if timed_out:
        result["error"] = f"pytest ran past its {timeout:.0f} s timeout and was stopped"
    if "passed" not in result:
        result.setdefault("error", f"pytest exited {child.returncode} without a JUnit report")
        result["ok"] = False
        return result
    clean = child.returncode == 0 and not timed_out and result["failed"] == 0 and result["errors"] == 0
    if device.type == "cuda":  # on a GPU every CUDA test must run: a skip means something is missing
        result["ok"] = clean and result["passed"] > 0 and result["skipped"] == 0
    else:  # the dry run: they skip cleanly without CUDA
        result["ok"] = clean
        result["note"] = "no CUDA: the CUDA tests are expected to skip"
    return result


def _kill_group(child: subprocess.Popen[str]) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        child.kill()


def _junit_counts(path: Path) -> dict[str, Any]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    cases = []
    for case in root.iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                reason = (element.get("message") or "").splitlines()
                cases.append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)),
                              "reason": reason[0][:300] if reason else ""})
                break
        else:
            cases.append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0))})
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"passed": passed, "failed": counts["failures"], "errors": counts["errors"], "skipped": counts["skipped"],
            "tests": cases}


# --- train ---
def run_train(args: argparse.Namespace, device: torch.device, workdir: Path) -> dict[str, Any]:
    from charlm.checkpoint import load_checkpoint
    from charlm.train import train
    from charlm.train_config import TrainConfig

    if not args.corpus.is_file():
        return {"ok": False, "error": f"corpus {args.corpus} not found"}
    sizes: dict[str, Any] = {}
    for name, tiny in TINY.items():
        given = getattr(args, "train_" + name)
        if given is not None:
            sizes[name] = given
        elif device.type == "cpu":
            sizes[name] = tiny
    out = workdir / "trained.safetensors"
    # One held-out evaluation, at the end: evaluations inside the budget would eat the training time.
    # A log row (chars/s, a loss read back from the device) every 10 steps on a GPU; every step in a CPU dry run,
    # which may take only a few.
    cfg = TrainConfig(corpus=(str(args.corpus),), out=str(out), time_budget=args.train_seconds, device=str(device),
                      eval_interval=10**9, log_interval=10 if device.type == "cuda" else 1, **sizes)
    rows: list[dict[str, Any]] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = train(cfg, rows.append)
    wall = time.perf_counter() - start
    rates = [r["chars_per_s"] for r in rows if "chars_per_s" in r]
    steady = rates[2:] or rates  # the first windows include warm-up (allocation, cuDNN plans)
    evals = [r["val_bpc"] for r in rows if "val_bpc" in r]
    losses = [r["train_bpc"] for r in rows if "train_bpc" in r]
    chars = result.step * cfg.batch_size * cfg.seq_len
    ckpt = load_checkpoint(out)
    vocab_size = len(ckpt.vocab)
    final = evals[-1] if evals else math.nan
    figures: dict[str, Any] = {
        "corpus": str(args.corpus),
        "checkpoint": str(out),
        "model": {**ckpt.config.to_dict(), "parameters": ckpt.model.num_parameters()},
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "precision": result.summary.get("precision"),
        "time_budget_s": args.train_seconds,
        "steps": result.step,
        "train_seconds": round(result.seconds, 2),
        "wall_s": round(wall, 2),
        "chars": chars,
        "chars_per_s": round(chars / result.seconds, 1) if result.seconds else None,
        "chars_per_s_median": round(statistics.median(steady), 1) if steady else None,
        "epochs": result.summary.get("epochs"),
        "train_bpc_last": round(losses[-1], 4) if losses else None,
        "final_val_bpc": round(final, 4),
        "best_val_bpc": round(result.best_val_bpc, 4),
        "uniform_bpc": round(math.log2(vocab_size), 4),
        "interrupted": result.interrupted,
    }
    if device.type == "cuda":
        figures["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    # It learnt something: the held-out text is predicted better than by a uniform guess over the characters.
    # Required on a GPU; a CPU dry run (a few seconds, perhaps a handful of steps) only reports it.
    figures["learned"] = math.isfinite(final) and final < figures["uniform_bpc"]
    ran = not result.interrupted and result.step > 0 and math.isfinite(final)
    figures["ok"] = ran and (figures["learned"] or device.type == "cpu")
    if not ran:
        figures["error"] = f"training stopped early or produced no model: {result.step} steps, held-out {final} bpc"
    elif not figures["ok"]:
        figures["error"] = (f"training did not learn: held-out {final:.4f} bpc after {result.step} steps "
                            f"(uniform: {figures['uniform_bpc']})")
    return figures


# --- decode ---
def run_decode(args: argparse.Namespace, device: torch.device, models: dict[str, Path | None], budget: float,
               ) -> dict[str, Any]:
    end = time.perf_counter() + budget
    figures: dict[str, Any] = {"length": args.decode_length, "repeats": args.repeats, "seed": DECODE_SEED,
                               "models": {}}
    for name, path in models.items():
        if path is None:  # its own section failed and says why
            figures["models"][name] = {"ran": False, "note": f"no {name} model: its section failed"}
            continue
        start = time.perf_counter()
        try:
            figures["models"][name] = decode_model(path, device, args.batches, args.decode_length, args.repeats, end)
        except Exception as exc:
            figures["models"][name] = {"ok": False, "path": str(path), **_error(exc)}
        figures["models"][name]["elapsed_s"] = round(time.perf_counter() - start, 2)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ran = [m for m in figures["models"].values() if m.get("ran", True)]
    figures["ok"] = bool(ran) and all(m.get("ok") for m in ran)
    return figures


def decode_model(path: Path, device: torch.device, batches: list[int], length: int, repeats: int, end: float,
                 ) -> dict[str, Any]:
    from charlm.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path, device)
    seed = "".join(c for c in DECODE_SEED if c in ckpt.vocab) or ckpt.vocab.chars[0]
    result: dict[str, Any] = {"path": str(path), "parameters": ckpt.model.num_parameters(),
                              "model": ckpt.config.to_dict(), "seed": seed, "batches": {}}
    for batch in batches:
        try:
            result["batches"][str(batch)] = decode_batch(ckpt, device, seed, batch, length, repeats, end)
        except Exception as exc:
            result["batches"][str(batch)] = {"ok": False, **_error(exc)}
    result["ok"] = all(b.get("ok") for b in result["batches"].values())
    return result


def decode_batch(ckpt: Any, device: torch.device, seed: str, batch: int, length: int, repeats: int, end: float,
                 ) -> dict[str, Any]:
    """Aggregate chars/s of `batch` requests of `length` characters submitted at once: the median of `repeats`
    timed runs after one short warm-up run at the same batch."""
    from charlm.engine import Engine
    from charlm.request import EngineLimits, GenerationRequest

    if time.perf_counter() >= end:
        return {"ok": False, "error": "not run: the decode section's budget was spent"}
    limits = EngineLimits(max_batch=batch, max_queue=max(batch, EngineLimits.max_queue))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs: list[dict[str, float]] = []
    figures: dict[str, Any] = {}
    with Engine(ckpt.model, ckpt.vocab, limits) as engine:
        figures["native_kernels"] = engine.native
        figures["weights"] = getattr(engine, "weights", "fp32")  # the decode weight format, where engines have one

        def one_run(n_chars: int, first: int) -> dict[str, float]:
            requests = [GenerationRequest(seed, length=n_chars, random_seed=first + i) for i in range(batch)]
            steps0, rows0 = engine.stats.steps, engine.stats.batch_rows
            start = time.perf_counter()
            gens = engine.submit_many(requests)
            results = [g.result(timeout=max(1.0, end - time.perf_counter())) for g in gens]
            wall = time.perf_counter() - start
            chars = sum(r.usage.generated_chars for r in results)
            if chars != batch * n_chars:
                raise RuntimeError(f"generated {chars} characters, expected {batch} x {n_chars}")
            steps = engine.stats.steps - steps0
            return {"chars": chars, "wall_s": wall, "chars_per_s": chars / wall,
                    "mean_rows_per_step": (engine.stats.batch_rows - rows0) / max(steps, 1), "steps": steps}

        one_run(min(length, 20), 10**6)  # warm-up: buffers at this batch, kernels, allocator
        for i in range(repeats):
            if time.perf_counter() >= end:
                figures["note"] = f"budget spent after {len(runs)} of {repeats} runs"
                break
            runs.append(one_run(length, i * batch))
    if not runs:
        return {"ok": False, "error": "not run: the decode section's budget was spent", **figures}
    figures.update({
        "ok": True,
        "chars_per_s": round(statistics.median(r["chars_per_s"] for r in runs), 1),
        "runs_chars_per_s": [round(r["chars_per_s"], 1) for r in runs],
        "wall_s": [round(r["wall_s"], 3) for r in runs],
        "chars_per_run": int(runs[0]["chars"]),
        "per_request_chars_per_s": round(statistics.median(r["chars_per_s"] for r in runs) / batch, 1),
        "mean_rows_per_step": round(statistics.median(r["mean_rows_per_step"] for r in runs), 1),
        "steps_per_run": int(statistics.median(r["steps"] for r in runs)),
    })
    if device.type == "cuda":
        figures["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    refusal = cuda_refusal()
    if refusal and not args.allow_cpu:
        print(f"gpu_check: error: {refusal}", file=sys.stderr)
        return 2
    device = torch.device("cpu" if refusal else "cuda")
    if device.type == "cpu":  # a dry run: its figures mean nothing, and on a shared machine threads only fight
        torch.set_num_threads(1)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = Report(args.out, started, {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dry_run": device.type == "cpu",
        "environment": environment(device),
        "settings": settings,
    })

    def watchdog() -> None:
        with report.lock:
            if report.child is not None:
                _kill_group(report.child)
            report.finish(aborted=f"the {args.deadline:.0f} s deadline passed during section {report.current!r}")
            if report.workdir is not None:
                shutil.rmtree(report.workdir, ignore_errors=True)
        print(f"gpu_check: error: deadline of {args.deadline:.0f} s passed; partial report in {args.out}",
              file=sys.stderr, flush=True)
        os._exit(3)

    timer = threading.Timer(args.deadline, watchdog)
    timer.daemon = True
    timer.start()
    print(f"gpu_check: on {report.data['environment']['device_name']} ({device}), torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}; report -> {args.out}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        report.workdir = workdir = Path(tmp)
        if args.no_tests:
            with report.lock:
                report.data["sections"]["tests"] = {"ok": True, "ran": False, "note": "skipped by --no-tests"}
        else:
            report.section("tests", args.tests_timeout, lambda: run_tests(report, device, args.tests_timeout, workdir))
        train_budget = args.train_seconds + 60.0  # setup, the final held-out evaluation, the first steps' warm-up
        trained = report.section("train", train_budget, lambda: run_train(args, device, workdir))
        checkpoint = trained.get("checkpoint")
        models: dict[str, Path | None] = {
            "shipped": args.model, "trained": Path(checkpoint) if checkpoint and Path(checkpoint).exists() else None}
        report.section("decode", args.decode_budget, lambda: run_decode(args, device, models, args.decode_budget))
        timer.cancel()
        with report.lock:
            ok = report.finish()
    print(f"gpu_check: {'ok' if ok else 'FAILED'} in {report.data['elapsed_s']:.0f} s; report in {args.out}",
          file=sys.stderr, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
