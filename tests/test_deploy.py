"""The deployment files held to the code they deploy: the Kubernetes manifests (deploy/kubernetes), the
one-host docker-compose.yml with its Prometheus config, and a read-only root filesystem, for real.

The manifests are built with a small kustomize of our own (resources, components, strategic-merge
patches, images: what deploy/kubernetes uses, and nothing else is accepted), checked against
`kubectl kustomize` where kubectl is installed, and validated offline with kubernetes-validate's
bundled schemas for Kubernetes KUBERNETES_VERSION, in strict mode (unknown fields are errors).
"""

from __future__ import annotations

import copy
import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml
from fastapi import FastAPI
from starlette.routing import Match, Mount

from app.main import create_app
from app.registry import ModelRegistry
from app.server import RESPONSE_MARGIN_SECONDS
from app.settings import Settings
from tests.server import Server, dockerfile_cmd, free_port
from tests.test_image import image_env, image_models_dir, instructions, shipped_models, stages

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
README = ROOT / "README.md"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_SCHEMA = ROOT / "tests" / "schemas" / "compose-spec.json"
MODEL_DOCKERFILE = KUBE / "overlays" / "external-model" / "model.Dockerfile"

# The Kubernetes version the manifests are validated for: still common in managed clusters, and
# every field used here is in its schemas (autoscaling/v2 behavior, policy/v1
# unhealthyPodEvictionPolicy, seccompProfile). Newer versions only add fields.
KUBERNETES_VERSION = "1.30.0"
# Resident memory of the served shipped model at the peak of a burst of 20 concurrent requests, with
# CHARLM_THREADS=2 (README, "Scaling out"). Memory requests and limits must leave 2x headroom over it.
MEASURED_PEAK_RSS_MIB = 353
MEMORY_HEADROOM = 2.0
# More models: a loaded model takes about 3x its file in memory (its weights, and the decoder's packed
# copy of them; measured: 36 MiB resident for the 13.3 MiB mysterious_island, part of the peak above).
# With CHARLM_MAX_LOADED models of at most CHARLM_MAX_MODEL_MB each, the memory limit must hold
# the rest of the peak plus that many models at that size.
MODEL_MEMORY_PER_FILE = 3.0
SHIPPED_MODEL_RSS_MIB = 36


def memory_bound_mib(settings: Settings) -> float:
    """Resident memory at most, with as many models loaded as the settings allow, each as large as allowed."""
    models = settings.max_loaded * MODEL_MEMORY_PER_FILE * settings.max_model_mb
    return MEASURED_PEAK_RSS_MIB - SHIPPED_MODEL_RSS_MIB + models

Doc = dict[str, Any]


# ---------------------------------------------------------------------------------------------------
# A small kustomize: enough for deploy/kubernetes, and loud about anything it does not implement.

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "components", "patches", "images"}
# Strategic merge: lists of objects merge by this key (Kubernetes' patchMergeKey), by `name` otherwise.
MERGE_KEYS = {"volumeMounts": "mountPath"}


def yaml_documents(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = strategic_merge(merged[key], value, key) if key in merged else copy.deepcopy(value)
        return merged
    key = MERGE_KEYS.get(field, "name")
    if (isinstance(base, list) and isinstance(patch, list)
            and all(isinstance(item, dict) and key in item for item in [*base, *patch])):
        merged_list = list(base)
        for item in patch:
            at = next((i for i, old in enumerate(merged_list) if old[key] == item[key]), None)
            if at is None:
                merged_list.append(copy.deepcopy(item))
            else:
                merged_list[at] = strategic_merge(merged_list[at], item)
        return merged_list
    return copy.deepcopy(patch)


def pod_containers(doc: Doc) -> list[Doc]:
    if doc["kind"] != "Deployment":
        return []
    spec = doc["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def set_images(docs: list[Doc], images: list[Doc]) -> None:
    """kustomize's `images:` transformer: rename, retag or pin by digest the images named `name`."""
    for container in (c for doc in docs for c in pod_containers(doc)):
        image = container["image"]
        name, colon, tag = image.rpartition(":")
        if not colon or "/" in tag:  # no tag (the colon was a registry's port)
            name, tag = image, ""
        for entry in images:
            if entry["name"] == name:
                new_tag = entry.get("newTag", tag)
                suffix = f"@{entry['digest']}" if "digest" in entry else (f":{new_tag}" if new_tag else "")
                container["image"] = entry.get("newName", name) + suffix


def build(directory: Path, kustomization: Doc | None = None, docs: list[Doc] | None = None) -> list[Doc]:
    """The resources `kubectl kustomize directory` would give (a component adds to `docs`)."""
    k = kustomization if kustomization is not None else yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(k) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{directory}: this test's kustomize does not implement {sorted(unknown)}"
    docs = list(docs or [])
    for resource in k.get("resources", []):
        path = directory / resource
        docs += build(path) if path.is_dir() else yaml_documents(path)
    for component in k.get("components", []):
        docs = build(directory / component, docs=docs)
    for patch_entry in k.get("patches", []):
        assert set(patch_entry) == {"path"}, f"only file patches are implemented: {patch_entry}"
        for patch in yaml_documents(directory / patch_entry["path"]):
            targets = [i for i, doc in enumerate(docs) if (doc["kind"], doc["metadata"]["name"])
                       == (patch["kind"], patch["metadata"]["name"])]
            assert len(targets) == 1, f"{patch_entry['path']} matches {len(targets)} resources"
            docs[targets[0]] = strategic_merge(docs[targets[0]], patch)
    set_images(docs, k.get("images", []))
    return docs


# The variants a user can apply: the default, the overlay, and the base with the optional component.
VARIANTS: dict[str, tuple[Path, Doc | None]] = {
    "default": (KUBE, None),
    "external-model": (KUBE / "overlays" / "external-model", None),
    "servicemonitor": (KUBE, {"resources": ["base"], "components": ["components/servicemonitor"]}),
}


# Every kustomization a user can `kubectl apply -k`: the variants and the base they share
# (test_every_kustomization_is_a_variant keeps this complete when an overlay or component is added).
RENDERED: dict[str, tuple[Path, Doc | None]] = {"base": (KUBE / "base", None), **VARIANTS}


def kustomizations() -> dict[str, list[Path]]:
    """The directories under deploy/kubernetes holding a kustomization.yaml, by kind (Kustomization,
    Component)."""
    found: dict[str, list[Path]] = {}
    for path in sorted(KUBE.rglob("kustomization.yaml")):
        kind = yaml.safe_load(path.read_text()).get("kind", "Kustomization")
        found.setdefault(kind, []).append(path.parent)
    return found


def kubectl_kustomize(kubectl: str, directory: Path, kustomization: Doc | None, scratch: Path) -> list[Doc]:
    """What `kubectl kustomize` renders for a variant (a kustomization of our own is written to `scratch`)."""
    if kustomization is not None:  # kustomize wants a directory; it takes relative paths only
        relative = {key: [os.path.relpath(directory / p, scratch) for p in paths]
                    for key, paths in kustomization.items()}
        (scratch / "kustomization.yaml").write_text(yaml.safe_dump(relative))
        directory = scratch
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


def project_version() -> str:
    """pyproject.toml's [project] version: the tag the image is built, deployed and composed with."""
    project = re.search(r"(?ms)^\[project\]$(.*?)(?=^\[)", (ROOT / "pyproject.toml").read_text())
    assert project, "pyproject.toml has no [project] table"
    version = re.search(r'(?m)^version\s*=\s*"([^"]+)"', project.group(1))
    assert version, "pyproject.toml's [project] has no literal version"
    return version.group(1)


def images_of(docs: list[Doc]) -> list[str]:
    """Every container image the documents name, wherever a pod template puts it."""
    found: list[str] = []

    def walk(value: Any, field: str = "") -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key == "image" and field in {"containers", "initContainers", "ephemeralContainers"}:
                    found.append(item)
                else:
                    walk(item, key if isinstance(item, list) else field)
        elif isinstance(value, list):
            for item in value:
                walk(item, field)

    walk(docs)
    return found


def mutable_image(image: str) -> str | None:
    """Why `image` can name another build tomorrow (None: it names one build): no tag means `latest`,
    and `latest` moves with every push. A digest names one build; a version tag is one by convention."""
    if re.search(r"@sha256:[0-9a-f]{64}$", image):
        return None
    name, colon, tag = image.rpartition(":")
    if not colon or "/" in tag:  # no tag (the colon was a registry's port)
        return f"{image}: untagged, which means :latest"
    if tag == "latest":
        return f"{image}: :latest names whatever was pushed last"
    return None


@cache
def _variant(name: str) -> str:
    directory, kustomization = VARIANTS[name]
    return json.dumps(build(directory, kustomization))


def variant(name: str) -> list[Doc]:
    docs: list[Doc] = json.loads(_variant(name))  # a fresh copy each time: tests may not share edits
    return docs


def the(docs: list[Doc], kind: str) -> Doc:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def server_container(deployment: Doc) -> Doc:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one container: the server"
    container: Doc = containers[0]
    return container


def configmap_env(docs: list[Doc], container: Doc) -> dict[str, str]:
    """The container's environment from its ConfigMaps (envFrom), which must be in the manifests."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert set(source) == {"configMapRef"}, f"only ConfigMap envFrom is expected: {source}"
        name = source["configMapRef"]["name"]
        maps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]
        assert maps, f"envFrom names ConfigMap {name}, which the manifests do not define"
        env.update(maps[0]["data"])
    return env


def server_env(docs: list[Doc], container: Doc) -> dict[str, str | None]:
    """The container's CHARLM_* environment: its ConfigMaps', then its own `env` (which wins), where a
    value from a Secret is None (the name must be right; the value is not ours)."""
    env: dict[str, str | None] = dict(configmap_env(docs, container))
    for entry in container.get("env", []):
        env[entry["name"]] = entry.get("value")
    return env


def model_image_dir() -> PurePosixPath:
    """Where overlays/external-model's model image (model.Dockerfile) puts its models: its one COPY's
    destination, a directory of *.safetensors."""
    copies = [args for keyword, args in instructions(MODEL_DOCKERFILE.read_text()) if keyword == "COPY"]
    assert len(copies) == 1, copies
    *sources, destination = shlex.split(copies[0])
    assert sources == ["*.safetensors"] and destination.endswith("/"), copies[0]
    return PurePosixPath(destination)


def copy_models(files: list[Path], directory: Path) -> Path:
    """A directory holding these model files (copies: the registry skips links that leave it)."""
    directory.mkdir(parents=True, exist_ok=True)
    for file in files:
        shutil.copyfile(file, directory / file.name)
    return directory


def cpu_cores(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def mebibytes(quantity: str | int) -> float:
    units = {"Ki": 2**-10, "Mi": 1, "Gi": 2**10, "k": 1e3 / 2**20, "M": 1e6 / 2**20, "G": 1e9 / 2**20}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]i?|k)?", str(quantity))
    assert match, f"unexpected quantity {quantity!r}"
    return float(match.group(1)) * (units[match.group(2)] if match.group(2) else 2**-20)


# ---------------------------------------------------------------------------------------------------
# What the image and the app really do.

def final_stage() -> list[tuple[str, str]]:
    return stages()[-1]


def image_port() -> int:
    """The port the image serves: its CHARLM_PORT, which its EXPOSE must repeat."""
    stage = final_stage()
    env = " ".join(args for keyword, args in stage if keyword == "ENV")
    match = re.search(r"\bCHARLM_PORT=(\d+)\b", env)
    assert match, "the image sets no CHARLM_PORT"
    exposed = [args.split("/")[0] for keyword, args in stage if keyword == "EXPOSE"]
    assert exposed == [match.group(1)], f"EXPOSE {exposed} is not CHARLM_PORT={match.group(1)}"
    return int(match.group(1))


def image_user() -> tuple[int, int]:
    users = [args for keyword, args in final_stage() if keyword == "USER"]
    uid, _, gid = users[-1].partition(":")
    return int(uid), int(gid or uid)


@cache
def _app() -> FastAPI:
    return create_app(Settings())


def serves_get(path: str) -> bool:
    """Whether one of the app's routes (app.routes: routes and included routers; static mounts, which
    match any path below them, left out) answers GET `path`: routing as Starlette does it."""
    app = _app()
    scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "path_params": {}, "app": app,
             "headers": [], "query_string": b""}
    return any(route.matches(scope)[0] == Match.FULL for route in app.routes if not isinstance(route, Mount))


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read CHARLM_* from the environment: none of the test runner's may leak in."""
    for name in list(os.environ):
        if name.startswith("CHARLM_"):
            monkeypatch.delenv(name)


def settings_from(env: dict[str, str | None]) -> Settings:
    """Settings as the server would build them from these variables (unset ones: the defaults); every
    name must be a real setting, since pydantic-settings ignores unknown CHARLM_* names silently."""
    values: dict[str, Any] = {}
    for name, value in env.items():
        assert name.startswith("CHARLM_"), name
        field = name.removeprefix("CHARLM_").lower()
        assert field in Settings.model_fields, f"{name} is not a setting of app.settings.Settings"
        if value is not None:
            values[field] = value
    return Settings(**values)


# ---------------------------------------------------------------------------------------------------
# Kubernetes

@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_manifest_validates_against_the_kubernetes_schemas(name: str) -> None:
    docs = variant(name)
    kinds = sorted(doc["kind"] for doc in docs)
    assert {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= set(kinds)
    assert "Secret" not in kinds, "no Secret is shipped: CHARLM_API_KEY comes from one the user creates"
    errors = []
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD, not in the Kubernetes schemas: test_the_servicemonitor_scrapes_the_service
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.absolute_path)}")
    assert not errors, "\n".join(errors)


def test_the_validator_refuses_a_misspelt_field_and_a_wrong_type() -> None:
    """The check above is real: strict mode rejects what a typo in a manifest would look like."""
    deployment = the(variant("default"), "Deployment")
    misspelt = copy.deepcopy(deployment)
    server_container(misspelt)["readinesProbe"] = server_container(misspelt).pop("readinessProbe")
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    for broken in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_kubectl_kustomize_builds_what_this_test_builds(name: str, tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (its built-in kustomize would cross-check this test's loader)")
    directory, kustomization = VARIANTS[name]
    rendered = kubectl_kustomize(kubectl, directory, kustomization, tmp_path)

    def unordered(value: Any, field: str = "") -> Any:
        """Lists of named objects (env, volumes, volumeMounts, ...) as sets: where a patch adds an item,
        kustomize puts it first and this test's merge last, and neither order means anything here."""
        if isinstance(value, dict):
            return {k: unordered(v, k) for k, v in value.items()}
        key = MERGE_KEYS.get(field, "name")
        if isinstance(value, list) and value and all(isinstance(v, dict) and key in v for v in value):
            return sorted((unordered(v) for v in value), key=lambda v: str(v[key]))
        return value

    def by_name(docs: list[Doc]) -> dict[tuple[str, str], Doc]:
        return {(doc["kind"], doc["metadata"]["name"]): unordered(doc) for doc in docs}

    theirs, ours = by_name(rendered), by_name(variant(name))
    assert theirs.keys() == ours.keys()
    for key in ours:
        assert theirs[key] == ours[key], f"{key}: kubectl kustomize and this test's loader differ"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_probes_and_ports_are_what_the_app_serves(name: str) -> None:
    docs = variant(name)
    deployment, port = the(docs, "Deployment"), image_port()
    container = server_container(deployment)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": port}, f"container ports {ports}, the image serves {port}"

    def resolve(value: str | int) -> int:
        return ports[value] if isinstance(value, str) else value

    expected = {"startupProbe": "/ready", "readinessProbe": "/ready", "livenessProbe": "/health"}
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, f"{probe} asks {get['path']}, the issue says {path}"
        assert serves_get(get["path"]), f"{probe}: the app has no GET {get['path']}"
        assert resolve(get["port"]) == port
        assert get.get("scheme", "HTTP") == "HTTP"
    service = the(docs, "Service")
    assert [resolve(p["targetPort"]) for p in service["spec"]["ports"]] == [port]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics" and serves_get("/metrics")
    assert annotations["prometheus.io/scrape"] == ("false" if name == "servicemonitor" else "true")
    for key in ("CHARLM_PORT", "CHARLM_HOST"):  # the image's own values (port, 0.0.0.0) must stand
        assert key not in configmap_env(docs, container) and key not in {e["name"] for e in container["env"]}


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.usefixtures("clean_env")
def test_every_charlm_variable_is_a_setting_with_a_valid_value(name: str) -> None:
    docs = variant(name)
    deployment = the(docs, "Deployment")
    container = server_container(deployment)
    settings_from(server_env(docs, container))  # raises on a misspelt name or a value the server would refuse
    config_names = [name for d in docs if d["kind"] == "ConfigMap" for name in d["data"]]
    assert config_names and all(n.startswith("CHARLM_") for n in config_names), config_names
    # Keys come from Secrets, optional ones (without them the service still starts: routes open, no admin
    # routes), each from a Secret of its own; never from a ConfigMap or a literal value.
    assert not [n for n in config_names if n.endswith("_KEY")], "a key in a ConfigMap is readable by all"
    from_secrets = {e["name"]: e["valueFrom"] for e in container["env"] if "valueFrom" in e}
    assert set(from_secrets) == {"CHARLM_API_KEY", "CHARLM_ADMIN_KEY"}, sorted(from_secrets)
    assert all(set(e) <= {"name", "value"} for e in container["env"] if "valueFrom" not in e)
    assert not [e["name"] for e in container["env"] if e["name"].endswith("_KEY") and "valueFrom" not in e]
    refs = {}
    for variable, source in from_secrets.items():
        assert set(source) == {"secretKeyRef"}, f"{variable}: only from a Secret"
        refs[variable] = source["secretKeyRef"]
        assert refs[variable]["optional"] is True, f"{variable}: without the Secret the service must still start"
    assert refs["CHARLM_API_KEY"]["name"] != refs["CHARLM_ADMIN_KEY"]["name"], (
        "the admin key needs a Secret of its own: the API key is handed to every client"
    )
    # A Service named `charlm` would otherwise inject CHARLM_PORT=tcp://... into the container.
    assert deployment["spec"]["template"]["spec"]["enableServiceLinks"] is False


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.usefixtures("clean_env")
def test_charlm_models_is_the_directory_the_models_are_in(name: str) -> None:
    """The base serves the image's models (CHARLM_MODELS is the directory the Dockerfile copies them to,
    and no volume hides it); the overlay serves the model image's, copied by its init container into the
    volume the server mounts, read-only, exactly where CHARLM_MODELS points."""
    docs = variant(name)
    deployment = the(docs, "Deployment")
    pod, container = deployment["spec"]["template"]["spec"], server_container(deployment)
    env = server_env(docs, container)
    assert "CHARLM_CHECKPOINT" not in env, "a directory of models (CHARLM_MODELS), not one checkpoint"
    directories, files = settings_from(env).model_sources()
    assert not files and len(directories) == 1, f"one directory of models: {env.get('CHARLM_MODELS')!r}"
    models = PurePosixPath(str(env["CHARLM_MODELS"]))
    assert models.is_absolute(), models
    mounts = {PurePosixPath(m["mountPath"]): m for m in container.get("volumeMounts", [])}
    if name != "external-model":
        assert models == image_models_dir(), f"CHARLM_MODELS {models}: the image's models are in {image_models_dir()}"
        hiding = [str(p) for p in mounts if models.is_relative_to(p) or p.is_relative_to(models)]
        assert not hiding, f"{hiding} would hide or change the image's models"
        assert not pod.get("initContainers"), "the base needs nothing but the image"
        return
    assert models in mounts, f"CHARLM_MODELS {models} is not a mount path of the server: {sorted(map(str, mounts))}"
    mount = mounts[models]
    assert mount.get("readOnly") is True, "the server never writes its models: mount them read-only"
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert "emptyDir" in volume, volume
    fillers = [c for c in pod.get("initContainers", []) if any(m["name"] == volume["name"] for m in c["volumeMounts"])]
    assert len(fillers) == 1, "one init container fills the models volume"
    target = next(m["mountPath"] for m in fillers[0]["volumeMounts"] if m["name"] == volume["name"])
    command = fillers[0]["command"]
    assert command[:2] == ["sh", "-c"] and len(command) == 3, command
    copy_command = shlex.split(command[2])
    assert copy_command == ["cp", f"{model_image_dir()}/*.safetensors", f"{target}/"], (
        f"{command}: expected a copy of the model image's {model_image_dir()}/*.safetensors into {target}/"
    )


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.usefixtures("clean_env")
def test_the_default_model_is_one_of_the_models_served(name: str, tmp_path: Path) -> None:
    """The registry, configured as the pod's server is, over the models its directory holds (the image's
    for the base; for the overlay, the default model image's, which kustomization.yaml says is built
    from models/): it lists both shipped models and CHARLM_DEFAULT_MODEL names one of them (an unknown
    one would stop the server at start)."""
    docs = variant(name)
    env = server_env(docs, server_container(the(docs, "Deployment")))
    if name == "external-model":
        files = sorted((ROOT / "models").glob("*.safetensors"))  # model.Dockerfile's COPY *.safetensors
    else:
        files = [ROOT / "models" / f"{model}.safetensors" for model in shipped_models()]
    directory = copy_models(files, tmp_path / "models")
    registry = ModelRegistry(settings_from({**env, "CHARLM_MODELS": str(directory)}).registry_config())
    assert {"mysterious_island", "verne_small"} <= set(registry.ids()), registry.ids()
    assert env.get("CHARLM_DEFAULT_MODEL") == "mysterious_island", "name the default model explicitly"
    assert registry.resolve(None) == "mysterious_island"


@pytest.mark.usefixtures("clean_env")
def test_the_image_serves_every_model_it_carries_or_a_directory_mounted_over_them(tmp_path: Path) -> None:
    """The Dockerfile's environment: every shipped model, mysterious_island by default; and, since it names
    no default, a directory of one's own mounted over its models directory serves without more settings."""
    env: dict[str, str | None] = {k: v for k, v in image_env().items() if k.startswith("CHARLM_")}
    assert "CHARLM_DEFAULT_MODEL" not in env, "a directory mounted over the models would need that model"
    files = [ROOT / "models" / f"{model}.safetensors" for model in shipped_models()]
    image = copy_models(files, tmp_path / "image")
    registry = ModelRegistry(settings_from({**env, "CHARLM_MODELS": str(image)}).registry_config())
    assert registry.ids() == shipped_models() and registry.resolve(None) == "mysterious_island"
    own = copy_models([ROOT / "models" / "verne_small.safetensors"], tmp_path / "own")
    (own / "verne_small.safetensors").rename(own / "my_model.safetensors")
    registry = ModelRegistry(settings_from({**env, "CHARLM_MODELS": str(own)}).registry_config())
    assert registry.ids() == ["my_model"] and registry.resolve(None) == "my_model"


# CHARLM_* names the deployment files mention that are not settings, and why.
NOT_SETTINGS = {
    "CHARLM_PUBLISH": "docker-compose.yml's own variable: the host address it publishes the port on",
    "CHARLM_SERVICE_HOST": "what Kubernetes would inject for a Service named charlm (deployment.yaml: why not)",
}


def deployment_files() -> list[Path]:
    return [ROOT / "Dockerfile", ROOT / ".dockerignore", COMPOSE,
            *sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file())]


@pytest.mark.usefixtures("clean_env")
def test_every_charlm_name_the_deployment_files_set_or_mention_is_a_setting() -> None:
    """pydantic-settings ignores an unknown CHARLM_* variable without a word, so a misspelt or renamed
    setting would silently do nothing. Every name the manifests (every variant's ConfigMaps and container
    env), compose and the Dockerfile set is a field of Settings, and so is every one their comments name."""
    set_names: dict[str, str] = {}
    for variant_name in VARIANTS:
        docs = variant(variant_name)
        for doc in docs:
            if doc["kind"] == "ConfigMap":
                set_names.update({n: f"{variant_name}: ConfigMap {doc['metadata']['name']}" for n in doc["data"]})
        for container in pod_containers(the(docs, "Deployment")):
            set_names.update({e["name"]: f"{variant_name}: container {container['name']}"
                              for e in container.get("env", [])})
    set_names.update({n: "docker-compose.yml" for n in compose()["services"]["charlm"]["environment"]})
    for stage in stages():
        for keyword, args in stage:
            if keyword == "ENV":
                set_names.update({w.partition("=")[0]: "Dockerfile" for w in shlex.split(args)})
    charlm_names = {n: where for n, where in set_names.items() if n.startswith("CHARLM_")}
    assert {"CHARLM_MODELS", "CHARLM_MAX_LOADED", "CHARLM_API_KEY", "CHARLM_ADMIN_KEY"} <= set(charlm_names)
    fields = {f"CHARLM_{field.upper()}" for field in Settings.model_fields}
    unknown = {n: where for n, where in charlm_names.items() if n not in fields}
    assert not unknown, f"not settings of app.settings.Settings: {unknown}"
    assert "CHARLM_CHECKPOINT" not in charlm_names, "every deployment serves a directory (CHARLM_MODELS)"
    mentioned = {(name, str(path.relative_to(ROOT))) for path in deployment_files()
                 for name in re.findall(r"\bCHARLM_[A-Z0-9_]*[A-Z0-9]\b", path.read_text())}
    stale = sorted((n, where) for n, where in mentioned if n not in fields and n not in NOT_SETTINGS)
    assert not stale, f"mentioned, but not settings: {stale}"


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.usefixtures("clean_env")
def test_the_kubelet_waits_longer_than_the_server_drains(name: str) -> None:
    docs = variant(name)
    deployment = the(docs, "Deployment")
    settings = settings_from(dict(configmap_env(docs, server_container(deployment))))
    needed = settings.drain_seconds + settings.grace_seconds + RESPONSE_MARGIN_SECONDS
    grace_period = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace_period > needed, (
        f"terminationGracePeriodSeconds {grace_period} <= drain {settings.drain_seconds} + grace "
        f"{settings.grace_seconds} + margin {RESPONSE_MARGIN_SECONDS}: the kubelet would kill requests in flight"
    )


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_container_runs_as_the_images_user_on_a_read_only_root(name: str) -> None:
    deployment = the(variant(name), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    uid, gid = image_user()
    assert uid != 0
    pod_context = pod["securityContext"]
    assert (pod_context["runAsUser"], pod_context["runAsGroup"]) == (uid, gid), "not the Dockerfile's USER"
    assert pod_context["runAsNonRoot"] is True
    assert pod_context["seccompProfile"] == {"type": "RuntimeDefault"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in pod_containers(deployment):
        context = {**pod_context, **container["securityContext"]}
        label = container["name"]
        assert (context["runAsUser"], context["runAsGroup"], context["runAsNonRoot"]) == (uid, gid, True), label
        assert context["readOnlyRootFilesystem"] is True, label
        assert context["allowPrivilegeEscalation"] is False, label
        assert context["capabilities"] == {"drop": ["ALL"]}, label
        assert "privileged" not in context or context["privileged"] is False, label
        for mount in container.get("volumeMounts", []):
            if not mount.get("readOnly"):
                assert "emptyDir" in volumes[mount["name"]], f"{label} writes to {mount['mountPath']}: not an emptyDir"
    tmp = [m for m in server_container(deployment)["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert tmp and not tmp[0].get("readOnly") and "emptyDir" in volumes[tmp[0]["name"]]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_threads_match_the_cpu_limit_and_memory_has_headroom(name: str) -> None:
    docs = variant(name)
    container = server_container(the(docs, "Deployment"))
    resources = container["resources"]
    threads = int(configmap_env(docs, container)["CHARLM_THREADS"])
    assert threads == cpu_cores(resources["limits"]["cpu"]), "CHARLM_THREADS must equal the CPU limit"
    assert cpu_cores(resources["requests"]["cpu"]) <= cpu_cores(resources["limits"]["cpu"])
    request, limit = mebibytes(resources["requests"]["memory"]), mebibytes(resources["limits"]["memory"])
    assert MEMORY_HEADROOM * MEASURED_PEAK_RSS_MIB <= request <= limit, (request, limit)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.usefixtures("clean_env")
def test_the_memory_limit_holds_as_many_models_as_may_be_loaded(name: str) -> None:
    """The registry keeps at most CHARLM_MAX_LOADED models in memory, and loads no file over
    CHARLM_MAX_MODEL_MB: both are set next to the memory limit (the default 512 MiB per model would not
    fit), their worst case fits under it, and every shipped model is small enough to be served."""
    docs = variant(name)
    container = server_container(the(docs, "Deployment"))
    config = configmap_env(docs, container)
    assert {"CHARLM_MAX_LOADED", "CHARLM_MAX_MODEL_MB"} <= set(config), "state the memory bound in the ConfigMap"
    settings = settings_from(server_env(docs, container))
    limit = mebibytes(container["resources"]["limits"]["memory"])
    assert memory_bound_mib(settings) <= limit, (
        f"{settings.max_loaded} models of {settings.max_model_mb} MiB: {memory_bound_mib(settings):.0f} MiB "
        f"at most, over the {limit:.0f} MiB limit"
    )
    for model in (ROOT / "models").glob("*.safetensors"):
        assert model.stat().st_size <= settings.max_model_mb * 2**20, f"{model.name} is over CHARLM_MAX_MODEL_MB"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_selectors_autoscaler_and_budget_point_at_the_pods(name: str) -> None:
    docs = variant(name)
    deployment = the(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert the(docs, "Service")["spec"]["selector"].items() <= labels.items()
    assert the(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # The image the Dockerfile builds, as README's `docker build -t charlm:VERSION .` names it; kustomize
    # `images:` renames it for a registry. IfNotPresent is right because the tag names one build.
    version = project_version()
    images = {c["name"]: (c["image"], c["imagePullPolicy"]) for c in pod_containers(deployment)}
    assert images.pop("charlm") == (f"charlm:{version}", "IfNotPresent")
    assert images == ({"copy-model": (f"charlm-model:{version}", "IfNotPresent")} if name == "external-model" else {})
    hpa = the(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                            "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"] == 2
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    behavior = hpa["spec"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] < behavior["scaleDown"]["stabilizationWindowSeconds"]
    if name == "servicemonitor":
        monitor = the(docs, "ServiceMonitor")
        service = the(docs, "Service")
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        service_ports = {p["name"] for p in service["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in service_ports and serves_get(endpoint["path"])


def test_every_kustomization_is_a_variant() -> None:
    """A new overlay or component gets every test above (and the image check below) by being listed."""
    found = kustomizations()
    assert set(found) <= {"Kustomization", "Component"}, sorted(found)
    applied = {directory for directory, kustomization in RENDERED.values() if kustomization is None}
    assert set(found["Kustomization"]) == applied, "add the new kustomization to VARIANTS"
    used = {(directory / c).resolve() for directory, k in RENDERED.values() if k for c in k.get("components", [])}
    assert {d.resolve() for d in found.get("Component", [])} <= used, "add a variant using the new component"


@pytest.mark.parametrize("name", list(RENDERED))
def test_no_manifest_names_latest_or_an_untagged_image(name: str, tmp_path: Path) -> None:
    """What `kubectl kustomize` renders (this test's loader where kubectl is not installed) names images
    by version tag or digest: with `latest` (or no tag) each node runs whichever build it pulled first
    (imagePullPolicy IfNotPresent), and neither a rollout nor a rollback can say which build it means."""
    directory, kustomization = RENDERED[name]
    kubectl = shutil.which("kubectl")
    if kubectl:
        docs = kubectl_kustomize(kubectl, directory, kustomization, tmp_path)
    else:
        docs = build(directory, kustomization)
    images = images_of(docs)
    assert any(image.startswith("charlm:") for image in images), images
    problems = [problem for image in images if (problem := mutable_image(image))]
    assert not problems, "\n".join(problems)
    # The service image is the one the README builds: the project's version.
    assert {i for i in images if i.rpartition(":")[0] == "charlm"} == {f"charlm:{project_version()}"}, images


def test_the_mutable_image_check_is_real() -> None:
    assert mutable_image("charlm") and mutable_image("charlm:latest")
    registry = "registry.example.com:5000/charlm"
    assert mutable_image(registry) and mutable_image(f"{registry}:latest")
    assert not mutable_image("charlm:0.1.0") and not mutable_image(f"{registry}:0.1.0")
    assert not mutable_image("registry.example.com/charlm@sha256:" + "0" * 64)
    assert images_of([{"spec": {"template": {"spec": {"initContainers": [{"image": "a:1"}],
                                                      "containers": [{"image": "b"}]}}}}]) == ["a:1", "b"]


# ---------------------------------------------------------------------------------------------------
# docker-compose.yml and Prometheus

def compose() -> Doc:
    loaded: Doc = yaml.safe_load(COMPOSE.read_text())
    return loaded


# Compose's interpolation (Compose Specification, "Interpolation"): $$, $NAME, ${NAME}, and ${NAME<op>arg}
# with :- - :+ + :? ?. Nested interpolation in `arg` is not implemented and is refused.
INTERPOLATION = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: str, env: dict[str, str]) -> str:
    """`value` as `docker compose` reads it with the variables `env` set (from the shell or an .env file)."""
    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["named"]:
            return env.get(match["named"], "")
        parts = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-+?])(.*))?", match["braced"], re.DOTALL)
        assert parts, f"unsupported interpolation ${{{match['braced']}}}"
        name, operator, argument = parts.groups()
        assert "$" not in (argument or ""), f"nested interpolation is not implemented: {match[0]}"
        current = env.get(name)
        present = bool(current) if operator and operator.startswith(":") else current is not None
        if operator is None:
            return current or ""
        if operator.endswith("-"):
            return current if present and current is not None else argument
        if operator.endswith("+"):
            return argument if present else ""
        if not present:
            raise ValueError(f"{name}: {argument or 'required'}")
        return current or ""

    return INTERPOLATION.sub(substitute, value)


def published(port: str | int | Doc, env: dict[str, str]) -> tuple[str, str]:
    """(host address, container port) of a `ports:` entry; "" for the address when it names none, which
    Docker takes as every interface (0.0.0.0 and ::)."""
    if isinstance(port, dict):  # the long syntax
        return interpolate(str(port.get("host_ip", "")), env), interpolate(str(port["target"]), env)
    text = interpolate(str(port), env).split("/")[0]
    if text.startswith("["):  # [IPv6]:host:container
        address, _, rest = text[1:].partition("]:")
        return address, rest.rsplit(":", 1)[-1]
    fields = text.split(":")
    return (fields[0] if len(fields) == 3 else ""), fields[-1]


def compose_validator() -> jsonschema.Draft7Validator:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_compose_file_validates_against_the_compose_spec() -> None:
    validator = compose_validator()
    problems = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose())]
    assert not problems, "\n".join(problems)
    misspelt = compose()
    misspelt["services"]["charlm"]["stop_grace_periode"] = misspelt["services"]["charlm"].pop("stop_grace_period")
    assert not validator.is_valid(misspelt), "the schema must refuse an unknown key"


def seconds(duration: str) -> float:
    """A compose duration: 40s, 1m30s, 1h."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


def docker_mebibytes(value: str | int) -> float:
    """Docker's byte values: a number with b, k, m or g (binary units)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([bkmg])?", str(value).lower())
    assert match, f"unexpected size {value!r}"
    return float(match.group(1)) * {"b": 2**-20, "k": 2**-10, "m": 1.0, "g": 2**10}[match.group(2) or "b"]


@pytest.mark.usefixtures("clean_env")
def test_compose_serves_the_images_port_restricted_and_prometheus_scrapes_it() -> None:
    services = compose()["services"]
    charlm, port = services["charlm"], image_port()
    container_ports = {str(p).rsplit(":", 1)[-1].split("/")[0] for p in charlm["ports"]}
    assert container_ports == {str(port)}
    env = {k: (None if v is None else str(v)) for k, v in charlm["environment"].items()}
    settings = settings_from(env)
    assert settings.threads == charlm["cpus"], "CHARLM_THREADS must equal the CPU limit"
    needed = settings.drain_seconds + settings.grace_seconds + RESPONSE_MARGIN_SECONDS
    assert seconds(charlm["stop_grace_period"]) > needed, "docker's SIGKILL would cut the drain short"
    assert docker_mebibytes(charlm["mem_limit"]) >= MEMORY_HEADROOM * MEASURED_PEAK_RSS_MIB
    # As many models as may be loaded fit too (test_the_memory_limit_holds_as_many_models_as_may_be_loaded).
    assert {"CHARLM_MAX_LOADED", "CHARLM_MAX_MODEL_MB"} <= set(env), "state the memory bound next to mem_limit"
    assert memory_bound_mib(settings) <= docker_mebibytes(charlm["mem_limit"])
    # The image's models, served as the image serves them (its CHARLM_MODELS): nothing here overrides that.
    assert not {"CHARLM_MODELS", "CHARLM_CHECKPOINT"} & set(env) and "volumes" not in charlm
    # The keys: passed through from the shell or .env when set there (null), never set here, never empty
    # (`${CHARLM_ADMIN_KEY:-}` would set an empty key, which the server refuses at start).
    assert env["CHARLM_API_KEY"] is None and env["CHARLM_ADMIN_KEY"] is None
    assert charlm["read_only"] is True and charlm["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in charlm["security_opt"]
    assert any(t.split(":")[0] == "/tmp" for t in charlm["tmpfs"])

    prometheus = services["prometheus"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in prometheus["volumes"] if v.startswith("./")}
    config_path = next(host for host, target in mounts.items() if target == "/etc/prometheus/prometheus.yml")
    config = yaml.safe_load((ROOT / config_path).read_text())
    targets = {(job.get("metrics_path", "/metrics"), target) for job in config["scrape_configs"]
               for static in job.get("static_configs", []) for target in static["targets"]}
    assert ("/metrics", f"charlm:{port}") in targets, targets
    assert serves_get("/metrics") and not serves_get("/no-such-route")


def section(text: str, heading: str) -> str:
    """A markdown section: from its heading to the next heading of the same or a higher level (a `#`
    line inside a fenced code block is a comment, not a heading)."""
    level = len(heading.split(" ")[0])
    lines: list[str] = []
    inside = fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"(#+) ", line)):
            if inside and len(match.group(1)) <= level:
                break
            inside = inside or line == heading
        if inside:
            lines.append(line)
    assert lines, f"no section {heading!r}"
    return "\n".join(lines)


LOOPBACK = {"127.0.0.1", "::1"}


def test_compose_publishes_on_loopback_unless_told_otherwise() -> None:
    """The API key is optional, so no port is reachable from other machines by default; CHARLM_PUBLISH
    widens the service's (and only the service's), and the README says to set a key when doing so."""
    services = compose()["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            address, _ = published(port, {})
            assert address in LOOPBACK, f"{name} publishes {port!r} on {address or 'every interface'}"
    charlm = services["charlm"]
    wider = {"CHARLM_PUBLISH": "0.0.0.0"}
    assert {published(p, wider) for p in charlm["ports"]} == {("0.0.0.0", str(image_port()))}
    assert {published(p, {"CHARLM_PUBLISH": "192.0.2.7"}) for p in charlm["ports"]} == {("192.0.2.7", "8000")}
    assert {published(p, wider)[0] for p in services["prometheus"]["ports"]} <= LOOPBACK
    # Publishing wider wants a key: it must reach the container from the shell or .env (null: pass-through).
    assert "CHARLM_API_KEY" in charlm["environment"] and charlm["environment"]["CHARLM_API_KEY"] is None
    docs = section(README.read_text(), "### One host: docker compose")
    assert "CHARLM_PUBLISH" in docs and "CHARLM_API_KEY" in docs, "the README must say how, and to set a key"
    widening = [block for block in fenced_blocks(docs) if re.search(r"\bCHARLM_PUBLISH=", block)]
    assert widening, "the README shows no command that publishes wider"
    assert all(re.search(r"\bCHARLM_API_KEY=", block) for block in widening), "... and it must set a key too"


def fenced_blocks(markdown: str) -> list[str]:
    blocks: list[str] = re.findall(r"^```[^\n]*\n(.*?)^```", markdown, re.MULTILINE | re.DOTALL)
    return blocks


def code_lines(markdown: str) -> str:
    """The fenced code of `markdown`, continued lines joined."""
    return re.sub(r"\\\n\s*", " ", "\n".join(fenced_blocks(markdown)))


def test_the_port_parser_and_interpolation_are_compose_s() -> None:
    assert published("8000:8000", {}) == ("", "8000") and published("8000", {}) == ("", "8000")
    assert published("127.0.0.1:9090:9090/tcp", {}) == ("127.0.0.1", "9090")
    assert published("[::1]:8000:8000", {}) == ("::1", "8000")
    assert published({"target": 8000, "host_ip": "127.0.0.1", "published": "8000"}, {}) == ("127.0.0.1", "8000")
    assert interpolate("${A:-x}|${A-y}|$A|$$A|${A:+z}", {"A": ""}) == "x|||$A|"
    assert interpolate("${A:-x}|${A-y}|${A}|$${A}|${A:+z}|${A+w}", {"A": "a"}) == "a|a|a|${A}|z|w"
    assert interpolate("${B-y}|${B+w}", {}) == "y|"
    with pytest.raises(ValueError, match="set it"):
        interpolate("${B:?set it}", {"B": ""})


def test_every_image_is_tagged_with_a_version() -> None:
    """compose builds the image under the tag the manifests deploy (not `latest`), and the README's
    deployment sections build and load that same tag."""
    version = project_version()
    services = compose()["services"]
    assert services["charlm"]["image"] == f"charlm:{version}"
    for name, service in services.items():
        assert not mutable_image(service["image"]), f"{name}: {mutable_image(service['image'])}"
    readme = README.read_text()
    for heading in ("## Docker", "### Kubernetes", "### One host: docker compose"):
        text = section(readme, heading)
        assert "charlm:latest" not in text and "-model:latest" not in text, f"README, {heading}: names latest"
    builds = re.findall(r"docker build\b[^\n]*", code_lines(section(readme, "### Kubernetes")))
    assert any(f"-t charlm:{version} " in b for b in builds), builds
    assert f"-t charlm:{version} " in code_lines(section(readme, "## Docker"))


# ---------------------------------------------------------------------------------------------------
# A read-only root filesystem, for real

def readonly_command(writable: Path, readonly: list[Path]) -> list[str]:
    """A command prefix that runs its command in a mount namespace of its own where the whole root
    filesystem is read-only (the / mount, plus each of `readonly` in case it lies on another mount),
    except `writable`, a mount of its own that stays writable: what readOnlyRootFilesystem with an
    emptyDir gives the container. Nothing outside the namespace changes. Exit 97: not permitted here."""
    lines = ["set -u"]
    lines += [f"mount --bind {shlex.quote(str(p))} {shlex.quote(str(p))} && "
              f"mount -o remount,ro,bind {shlex.quote(str(p))} || exit 97" for p in readonly]
    lines.append(f"mount --bind {shlex.quote(str(writable))} {shlex.quote(str(writable))} || exit 97")
    lines.append("mount -o remount,ro,bind / || exit 97")
    lines.append('exec "$@"')
    user = [] if os.geteuid() == 0 else ["--map-root-user"]
    return ["unshare", "--mount", "--propagation", "private", *user, "--", "bash", "-c", "\n".join(lines), "bash"]


WRITE_PROBE = """
import errno, json, sys, tempfile
results = {}
for directory in sys.argv[1:]:
    try:
        open(directory + "/.charlm-write-probe", "w").close()
        results[directory] = "written"
    except OSError as exc:
        results[directory] = errno.errorcode[exc.errno]
with tempfile.NamedTemporaryFile() as f:
    f.write(b"scratch")
    results["tempdir"] = f.name
print(json.dumps(results))
"""


@pytest.fixture
def readonly_tree() -> Iterator[tuple[list[str], Path, Path, list[Path]]]:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("unshare/mount (util-linux) are not installed")
    scratch = Path(tempfile.mkdtemp(prefix="charlm-rofs-"))
    writable, home = scratch / "tmp", scratch / "home"
    writable.mkdir()
    home.mkdir()
    assert not writable.resolve().is_relative_to(ROOT)
    # Everything the server reads: the repository (with its models and, in .venv, the installed
    # packages) and the Python installation; and the HOME the image gives its user.
    readonly = sorted({ROOT, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), home})
    try:
        yield readonly_command(writable, readonly), writable, home, readonly
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def container_env(home: Path, writable: Path, **extra: str) -> dict[str, str]:
    """The test runner's environment as the image's would be: no CHARLM_* of ours, and Python writing
    bytecode as it does in the image (so its attempts meet the read-only filesystem)."""
    drop = ("PYTHONDONTWRITEBYTECODE", "MPLCONFIGDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARLM_") and k not in drop}
    return {**env, "HOME": str(home), "TMPDIR": str(writable), **extra}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_server_serves_from_a_read_only_root_filesystem(
    readonly_tree: tuple[list[str], Path, Path, list[Path]],
) -> None:
    prefix, writable, home, readonly = readonly_tree
    site = Path(sysconfig.get_paths()["purelib"])
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    must_fail = [ROOT, ROOT / "app", ROOT / "models", home, site, stdlib, *readonly]
    probe = subprocess.run([*prefix, sys.executable, "-c", WRITE_PROBE, *map(str, must_fail)], cwd=ROOT,
                           env=container_env(home, writable), capture_output=True, text=True, timeout=60)
    if probe.returncode == 97 or probe.stderr.startswith("unshare:"):
        pytest.skip(f"a read-only mount namespace is not permitted here: {probe.stderr.strip()[-300:]}")
    assert probe.returncode == 0, probe.stderr
    results = json.loads(probe.stdout)
    for directory in must_fail:
        if results[str(directory)] == "written":
            (directory / ".charlm-write-probe").unlink(missing_ok=True)
    assert {results[str(d)] for d in must_fail} == {errno.errorcode[errno.EROFS]}, results
    assert Path(results["tempdir"]).parent == writable, "tempfile must write to TMPDIR, the writable mount"

    # The server as the container starts it: the image's CMD, its models directory (CHARLM_MODELS) read
    # from the read-only tree, HOME and the working directory read-only, TMPDIR the only writable place.
    port = free_port()
    env = container_env(home, writable, CHARLM_MODELS=str(ROOT / "models"),
                        CHARLM_DEVICE="cpu", CHARLM_HOST="127.0.0.1", CHARLM_PORT=str(port), CHARLM_THREADS="1",
                        CHARLM_DRAIN_SECONDS="0")
    log = Path(tempfile.mkdtemp(prefix="charlm-server-")) / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen([*prefix, *dockerfile_cmd()], cwd=ROOT, env=env, stdout=sink,
                                   stderr=subprocess.STDOUT)
    server = Server(process, port, log)
    try:
        server.wait_ready(timeout=180)
        response = httpx.post(f"{server.url}/generate", timeout=60,
                              json={"seed": "The island", "length": 40, "random_seed": 1})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["text"].startswith("The island") and body["usage"]["generated_chars"] == 40
        assert body["model"] == "mysterious_island", "the default model"
        listing = httpx.get(f"{server.url}/v1/models", timeout=10).json()
        assert {"mysterious_island", "verne_small"} <= {m["id"] for m in listing["data"]}, listing
        # A second model, loaded on demand from the read-only tree.
        response = httpx.post(f"{server.url}/generate", timeout=60,
                              json={"model": "verne_small", "seed": "The", "length": 10, "random_seed": 1})
        assert response.status_code == 200 and response.json()["model"] == "verne_small", response.text
        assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, server.output()
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
    output = server.output()
    assert "Traceback" not in output and "Read-only file system" not in output, output
    shutil.rmtree(log.parent, ignore_errors=True)
