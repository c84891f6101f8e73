"""The model registry: the models a server can serve, loaded on demand and unloaded when not needed.

Models come from directories (each `*.safetensors` in one is a model named by its file's stem; a
directory is looked at again whenever a listing or an unknown id asks, so a model copied in appears
without a restart) and from explicit id=path pairs. Only those can be named: an id is looked up in
what was found, never joined to a path, and a file whose real path leaves its directory is skipped.

A request pins the model it uses from lookup to submission; after that the model's engine counts
the work until it finishes. A model with pins or work is never evicted. Loads of one model are
shared (concurrent first requests wait for one load) and serialised with its reloads and unloads.
Every model's engine runs on one scheduler (charlm/scheduler.py), so models share the CPU fairly.

Hot reload: the file is read again, its checksum compared; a changed, loadable file becomes the
model for new work while work in flight finishes on the old weights, whose engine closes once it is
done. A file that does not load leaves the old model serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

from starlette.concurrency import run_in_threadpool

from app.metrics import Metrics
from charlm.checkpoint import Checkpoint, CheckpointError, CheckpointHeader, load_checkpoint, read_header
from charlm.device import resolve_device
from charlm.engine import Engine, EngineHooks
from charlm.files import file_sha256
from charlm.inputs import one_line
from charlm.native import WeightFormat
from charlm.prefix_cache import PrefixCache
from charlm.request import EngineLimits, GenerationRequest
from charlm.scheduler import Scheduler

__all__ = ["MODEL_ID", "ModelBusy", "ModelInfo", "ModelRegistry", "ModelUnavailable", "Served", "UnknownModel",
           "model_id_for"]

log = logging.getLogger("charlm")

# What a model id may be: a file stem without path separators, dots first or anything a shell or a
# URL would have to escape.
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SUFFIX = ".safetensors"
VERSION_CHARS = 12  # of the file's sha256: the version a response names
FileKey = tuple[int, int, int]  # (inode, size, mtime_ns): a file replaced by rename gets a new inode


def model_id_for(path: Path) -> str:
    """The id a file serves as: its stem, with characters an id may not have replaced by '-'."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", path.stem).lstrip("._-")[:128]
    return cleaned or "model"


class UnknownModel(LookupError):
    def __init__(self, model_id: str, known: list[str]):
        shown = model_id if len(model_id) <= 100 else model_id[:100] + "..."
        listed = ", ".join(f"'{k}'" for k in known[:20]) + (f" and {len(known) - 20} more" if len(known) > 20 else "")
        super().__init__(f"The model '{shown}' does not exist: this server has {listed or 'no models'} "
                         "(GET /v1/models lists them)")
        self.known = known


class ModelUnavailable(RuntimeError):
    """The model's file does not load; the message is the checkpoint's own one-line error."""


class ModelBusy(RuntimeError):
    """No room to load a model: every loaded one has work in flight."""


@dataclass(eq=False)
class Served:
    """A loaded model: what a request uses (its engine) and says it used (id and version)."""

    id: str
    version: str  # the start of sha256: what responses name
    sha256: str  # all of it: what the prefix cache keys states by
    checkpoint: Checkpoint
    engine: Engine
    path: Path
    key: FileKey
    pins: int = 0
    unpinned: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def fingerprint(self) -> str:
        """OpenAI's `system_fingerprint`: which weights made a response."""
        return f"fp_{self.version}"

    def idle(self) -> bool:
        return self.pins == 0 and self.engine.unfinished == 0


@dataclass(frozen=True)
class ModelInfo:
    """A model as a listing shows it: loaded or not, and why it cannot be loaded if it cannot."""

    id: str
    file: str  # the file's name (never its path: where it lies is nobody's business)
    default: bool
    loaded: bool
    version: str | None  # of the weights in memory, when loaded
    header: CheckpointHeader | None  # None when the file's header does not read
    error: str | None  # why the model is unavailable, else None
    created: int  # its training date, else its file's time (Unix seconds)

    @property
    def status(self) -> Literal["loaded", "available", "unavailable"]:
        return "loaded" if self.loaded else "unavailable" if self.error else "available"

    @property
    def bpc(self) -> float | None:
        value = (self.header.train if self.header else {}).get("val_bpc")
        return float(value) if isinstance(value, int | float) else None


@dataclass(eq=False)
class _Entry:
    id: str
    path: Path
    explicit: bool  # named by an id=path pair (kept when its file goes), not found in a directory
    served: Served | None = None
    loading: asyncio.Task[Served] | None = None
    waiting: int = 0  # requests waiting for its load: it must not be evicted under them
    failed: tuple[FileKey | None, str] | None = None  # the file as it was when it failed to load, and why
    header: tuple[FileKey, CheckpointHeader | str] | None = None  # cached header, or why it does not read
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(frozen=True)
class RegistryConfig:
    """What the registry needs of the settings (app/settings.py documents each)."""

    directories: tuple[Path, ...]
    files: dict[str, Path]
    default: str | None
    device: str
    limits: EngineLimits
    max_loaded: int
    keep_alive: float | None
    max_model_bytes: int
    load_timeout: float  # how long a request waits for room to load its model
    retire_grace: float  # how long an unloaded or replaced model's work in flight may still run
    prefix_cache_bytes: int = 0  # the prefix cache's budget, shared by all models (0: no cache)
    weights: WeightFormat | None = None  # every model's decode weights (None: each checkpoint's own)


class ModelRegistry:
    """Every model the server knows; loads, evicts, unloads and reloads them (see the module's doc).
    Used from the event loop; the loading itself runs in threads."""

    def __init__(self, config: RegistryConfig, hooks: EngineHooks | None = None, metrics: Metrics | None = None):
        self.config, self._hooks, self._metrics = config, hooks, metrics
        self._entries: dict[str, _Entry] = {}
        self._retiring: set[asyncio.Future[None]] = set()
        self._old: set[Served] = set()  # unloaded or replaced, finishing their work
        self.scheduler = Scheduler()
        self.cache = PrefixCache(config.prefix_cache_bytes) if config.prefix_cache_bytes else None
        self.refresh()
        self.default = self._default_id()

    # --- what there is ---
    def refresh(self) -> None:
        """Look at the directories again: new files become models, files gone take their unloaded
        models with them (a loaded one keeps serving until it is unloaded)."""
        found = {**self._scan(), **self.config.files}
        for model_id, path in found.items():
            entry = self._entries.get(model_id)
            if entry is None or (entry.path != path and entry.served is None):
                self._entries[model_id] = _Entry(model_id, path, explicit=model_id in self.config.files)
        for model_id in [m for m, e in self._entries.items() if m not in found and e.served is None and not e.loading]:
            del self._entries[model_id]

    def _scan(self) -> dict[str, Path]:
        models: dict[str, Path] = {}
        for directory in self.config.directories:
            root = directory.resolve()
            try:
                names = sorted(os.listdir(root))
            except OSError as exc:
                log.warning("cannot list the models directory %s: %s", directory, exc.strerror or exc)
                continue
            for name in names:
                stem = name[: -len(SUFFIX)]
                path = root / name
                if not name.endswith(SUFFIX) or not MODEL_ID.fullmatch(stem) or stem in models:
                    continue
                if not path.resolve().is_relative_to(root):
                    log.warning("skipping %s: it links outside the models directory", path)
                    continue
                models[stem] = path
        return models

    def ids(self) -> list[str]:
        return sorted(self._entries)

    def _default_id(self) -> str | None:
        if self.config.default is not None:
            return self.config.default
        if "mysterious_island" in self._entries:
            return "mysterious_island"
        return self.ids()[0] if self._entries else None

    def _entry(self, model_id: str) -> _Entry:
        entry = self._entries.get(model_id)
        if entry is None and MODEL_ID.fullmatch(model_id):
            self.refresh()  # it may have been copied in since
            entry = self._entries.get(model_id)
        if entry is None:
            raise UnknownModel(model_id, self.ids())
        return entry

    def check_default(self) -> Path:
        """The default model's file, checked by loading it (before a server starts: a bad one fails in
        one line); ModelUnavailable or UnknownModel say what is wrong."""
        if self.default is None:
            where = ", ".join(map(str, self.config.directories)) or "CHARLM_MODELS"
            raise ModelUnavailable(f"no models to serve: no *.safetensors in {where} (set CHARLM_MODELS or "
                                   "CHARLM_CHECKPOINT)")
        path = self._entry(self.resolve(None)).path
        try:
            self._check_size(path)
            load_checkpoint(path, "cpu")
        except (OSError, ValueError) as exc:
            raise ModelUnavailable(one_line(exc)) from None
        return path

    def resolve(self, model_id: str | None) -> str:
        """The id a request names, or the default model's when it names none; UnknownModel if none such."""
        if model_id is None:
            if self.default is None:
                raise UnknownModel("(default)", self.ids())
            model_id = self.default
        return self._entry(model_id).id

    def loaded(self) -> list[Served]:
        return [e.served for e in self._entries.values() if e.served is not None]

    def engines(self) -> list[Engine]:
        """Every engine with work or able to take it: the loaded models' and those still finishing."""
        return [s.engine for s in self.loaded()] + [s.engine for s in self._old]

    def served(self, model_id: str) -> Served | None:
        entry = self._entries.get(model_id)
        return entry.served if entry else None

    async def listing(self) -> list[ModelInfo]:
        """Every model, with its header read (on a thread: a header may be large) once per file version."""
        self.refresh()
        entries = [entry for _, entry in sorted(self._entries.items())]
        return await run_in_threadpool(lambda: [self._info(entry) for entry in entries])

    async def info(self, model_id: str) -> ModelInfo:
        entry = self._entry(model_id)
        return await run_in_threadpool(self._info, entry)

    def _info(self, entry: _Entry) -> ModelInfo:
        key = _file_key(entry.path)
        header: CheckpointHeader | None = None
        error: str | None = None
        if entry.served is not None:
            header = CheckpointHeader(entry.served.checkpoint.config, entry.served.checkpoint.vocab,
                                      entry.served.checkpoint.train, entry.served.engine.weights)
        elif key is None:
            error = f"the file {entry.path.name} is gone"
        else:
            cached = self._header(entry, key)
            header, error = (cached, None) if isinstance(cached, CheckpointHeader) else (None, cached)
        if error is None and entry.failed is not None and entry.failed[0] == key:
            error = entry.failed[1] if entry.served is None else (
                f"its file does not load, version {entry.served.version} keeps serving: {entry.failed[1]}")
        return ModelInfo(entry.id, entry.path.name, entry.id == self.default, entry.served is not None,
                         entry.served.version if entry.served else None, header, error,
                         _created(header, entry.path))

    def _header(self, entry: _Entry, key: FileKey) -> CheckpointHeader | str:
        """The file's header, read once per version of the file."""
        if entry.header is None or entry.header[0] != key:
            try:
                self._check_size(entry.path)
                entry.header = (key, read_header(entry.path))
            except (OSError, ValueError) as exc:
                entry.header = (key, _without_directory(one_line(exc), entry.path))
        return entry.header[1]

    # --- using a model ---
    @asynccontextmanager
    async def use(self, model_id: str | None) -> AsyncIterator[Served]:
        """The model, loaded (waiting for its load if need be), pinned while the caller submits its work."""
        entry = self._entry(self.resolve(model_id))
        entry.last_used = time.monotonic()
        entry.waiting += 1
        try:
            served = entry.served or await self._ensure_loaded(entry)
        finally:
            entry.waiting -= 1
        served.pins += 1  # no await since the load: nothing can evict it in between
        served.unpinned.clear()
        try:
            yield served
        finally:
            served.pins -= 1
            entry.last_used = time.monotonic()
            if served.pins == 0:
                served.unpinned.set()

    async def _ensure_loaded(self, entry: _Entry) -> Served:
        if entry.loading is None:
            entry.loading = asyncio.ensure_future(self._load_task(entry))
            entry.loading.add_done_callback(lambda _: setattr(entry, "loading", None))
        return await asyncio.shield(entry.loading)

    async def _load_task(self, entry: _Entry) -> Served:
        async with entry.lock:
            if entry.served is not None:
                return entry.served
            key = _file_key(entry.path)
            if entry.failed is not None and entry.failed[0] == key:
                raise ModelUnavailable(entry.failed[1])
            await self._make_room(entry)
            served = await self._build(entry)
            entry.served = served
            return served

    async def _build(self, entry: _Entry) -> Served:
        """Load the model in a thread; remember a failure until its file changes."""
        key, started = _file_key(entry.path), time.perf_counter()
        try:
            served = await run_in_threadpool(self._load, entry.id, entry.path)
        except (OSError, ValueError) as exc:
            message = _without_directory(one_line(exc), entry.path)
            entry.failed = (key, message)
            log.warning("model %s is unavailable: %s", entry.id, message)
            if self._metrics:
                self._metrics.loads.labels(entry.id, "failed").inc()
            raise ModelUnavailable(message) from None
        entry.failed = None
        if self._metrics:
            self._metrics.loads.labels(entry.id, "ok").inc()
            self._metrics.load_seconds.observe(time.perf_counter() - started)
        return served

    def _load(self, model_id: str, path: Path) -> Served:
        """Read, check, hash and warm up one model (on a thread)."""
        started = time.perf_counter()
        key = self._check_size(path)
        digest = file_sha256(path)
        checkpoint = load_checkpoint(path, "cpu")
        if _file_key(path) != key:  # replaced while being read: what was hashed may not be what loaded
            raise CheckpointError(f"{path} changed while it was being loaded; try again once it is written")
        checkpoint.to(resolve_device(self.config.device))
        engine = Engine(checkpoint.model, checkpoint.vocab, self.config.limits, hooks=self._hooks,
                        scheduler=self.scheduler, cache=self.cache, version=digest,
                        weights=self.config.weights or checkpoint.weights)
        try:
            _warm_up(engine)
        except BaseException:
            engine.close(0)
            raise
        served = Served(model_id, digest[:VERSION_CHARS], digest, checkpoint, engine, path, key)
        log.info("loaded model %s version %s (%d parameters, %s decode weights) on %s in %.2f s", model_id,
                 served.version, checkpoint.model.num_parameters(), engine.weights, engine.device,
                 time.perf_counter() - started)
        return served

    def _check_size(self, path: Path) -> FileKey:
        key = _file_key(path)
        if key is None:
            raise CheckpointError(f"checkpoint not found: {path}")
        if key[1] > self.config.max_model_bytes:
            raise CheckpointError(f"{path} is {key[1]} bytes, over CHARLM_MAX_MODEL_MB "
                                  f"({self.config.max_model_bytes // 2**20} MiB); raise it to serve this model")
        return key

    async def _make_room(self, entry: _Entry) -> None:
        """Unload idle models, least recently used first, until one more fits; wait for one to go
        idle while every loaded model has work (ModelBusy after load_timeout)."""
        deadline = time.monotonic() + self.config.load_timeout
        while len(self.loaded()) >= self.config.max_loaded:
            idle = [e for e in self._entries.values() if e is not entry and e.served is not None
                    and e.served.idle() and not e.waiting]
            if idle:
                victim = min(idle, key=lambda e: e.last_used)
                log.info("unloading model %s to make room for %s (CHARLM_MAX_LOADED=%d)", victim.id, entry.id,
                         self.config.max_loaded)
                self._unload_now(victim)
                continue
            if time.monotonic() > deadline:
                raise ModelBusy(f"no room to load '{entry.id}': all {self.config.max_loaded} loaded models "
                                "(CHARLM_MAX_LOADED) have work in flight; retry shortly")
            await asyncio.sleep(0.02)  # a loaded model's work finishes on the engine's thread

    def _unload_now(self, entry: _Entry) -> None:
        """Take the model out of service now (synchronously, so no request can pin it after this);
        its engine closes in the background once its work is done."""
        served, entry.served = entry.served, None
        if served is not None:
            self._retire(served)

    def _retire(self, served: Served) -> None:
        """Close a model's engine once nothing is pinned to it and its work has finished."""

        async def wait_then_close() -> None:
            try:
                if served.pins:
                    await served.unpinned.wait()
                await run_in_threadpool(served.engine.close, self.config.retire_grace)
            finally:
                self._old.discard(served)
                if self.cache is not None and all(s.sha256 != served.sha256 for s in self.loaded()):
                    self.cache.drop(served.sha256)

        self._old.add(served)
        task = asyncio.ensure_future(wait_then_close())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    # --- management ---
    async def load(self, model_id: str) -> Served:
        """Load now (the admin route and CHARLM_PRELOAD); a model that failed is tried again."""
        entry = self._entry(model_id)
        entry.failed = None
        async with self.use(model_id) as served:
            return served

    async def unload(self, model_id: str) -> bool:
        """Unload: new requests load it again; work in flight finishes first. False if it was not loaded."""
        entry = self._entry(model_id)
        async with entry.lock:
            loaded = entry.served is not None
            self._unload_now(entry)
        return loaded

    async def reload(self, model_id: str) -> tuple[str | None, str]:
        """Read the model's file again and serve it if it changed: (old version, new version). A file
        that does not load raises ModelUnavailable and the old model keeps serving."""
        entry = self._entry(model_id)
        async with entry.lock:
            old = entry.served
            entry.failed = None
            if old is None:
                await self._make_room(entry)
            new = await self._build(entry)
            if old is not None and new.version == old.version:
                await run_in_threadpool(new.engine.close, 0)
                return old.version, old.version
            entry.served = new
            if old is not None:
                log.info("reloaded model %s: version %s -> %s; work in flight finishes on %s", model_id,
                         old.version, new.version, old.version)
                self._retire(old)
            return (old.version if old else None), new.version

    async def reload_changed(self) -> None:
        """SIGHUP: look at the directories again and reload every loaded model whose file changed."""
        self.refresh()
        for entry in list(self._entries.values()):
            if entry.served is not None and _file_key(entry.path) != entry.served.key:
                try:
                    await self.reload(entry.id)
                except (ModelUnavailable, UnknownModel) as exc:
                    log.warning("reload of %s refused, version %s keeps serving: %s", entry.id,
                                entry.served.version if entry.served else "-", exc)

    async def unload_idle(self) -> None:
        """CHARLM_KEEP_ALIVE: unload models (not the default) idle for longer than it."""
        keep = self.config.keep_alive
        if keep is None:
            return
        now = time.monotonic()
        for entry in list(self._entries.values()):
            served = entry.served
            if served is None or entry.id == self.default:
                continue
            if not served.idle() or entry.waiting:
                entry.last_used = now
            elif now - entry.last_used > keep:
                log.info("unloading model %s: idle for %.0f s (CHARLM_KEEP_ALIVE)", entry.id, now - entry.last_used)
                self._unload_now(entry)

    async def close(self, grace: float) -> None:
        """Finish work in flight for up to `grace` seconds, then stop every engine and the scheduler."""
        engines = self.engines()
        for entry in self._entries.values():
            entry.served = None
        await asyncio.gather(*(run_in_threadpool(e.close, grace) for e in engines))
        for task in list(self._retiring):
            task.cancel()
        await run_in_threadpool(self.scheduler.close)


def _warm_up(engine: Engine) -> None:
    """One real generation, so a loaded model is known to work, not just to have read."""
    seed = "The" if not engine.vocab.unknown("The") else engine.vocab.chars[0]
    engine.generate(GenerationRequest(seed=seed, length=16, random_seed=0), timeout=60)


def _without_directory(message: str, path: Path) -> str:
    """A checkpoint error as a client may see it: the file named, not where it lies on this machine."""
    return message.replace(str(path.resolve()), path.name).replace(str(path), path.name)


def _file_key(path: Path) -> FileKey | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _created(header: CheckpointHeader | None, path: Path) -> int:
    """When the model was made: its training date, else its file's time, else 0 (unknown)."""
    date = header.train.get("date") if header else None
    if isinstance(date, str):
        try:
            return int(datetime.fromisoformat(date).timestamp())
        except ValueError:
            pass
    try:
        return int(path.stat().st_mtime)
    except OSError:
        return 0

