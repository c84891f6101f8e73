"""Every setting of the service, from CHARLM_* environment variables, with defaults that serve every
model in the repository's models/.

Per-request limits take their defaults from the engine's EngineLimits (their one home); the
connection settings are handed to uvicorn as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.registry import MODEL_ID, RegistryConfig, model_id_for
from charlm import native
from charlm.native import WeightFormat
from charlm.request import MAX_LOGPROBS, EngineLimits

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
_LIMITS = EngineLimits()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHARLM_", extra="ignore")

    models: str | None = Field(None, description="comma-separated directories of *.safetensors models (each "
                               "named by its file's stem) and id=path pairs; default: the repository's models/")
    checkpoint: Path | None = Field(None, description="one .safetensors model to serve (with CHARLM_MODELS: one more)")
    default_model: str | None = Field(None, description="the model a request without `model` gets (default: "
                                      "CHARLM_CHECKPOINT's, else mysterious_island if there, else the first id)")
    preload: Literal["default", "all", "none"] = Field("default", description="models loaded at start")
    max_loaded: int = Field(4, ge=1, description="models in memory at once; the least recently used idle one "
                            "is unloaded to make room")
    keep_alive: float | None = Field(None, gt=0, description="seconds a model other than the default stays "
                                     "loaded while idle (default: until evicted)")
    max_model_mb: int = Field(512, ge=1, description="model files larger than this are not loaded")
    prefix_cache_mb: float = Field(64, ge=0, description="MiB of LSTM states kept after long prefixes, so "
                                   "text sent again is not run again (0: off)")
    weights: WeightFormat | None = Field(None, description="decode weight format of every model: fp32, bf16 "
                                         "or int8 (default: each checkpoint's own, set by `charlm quantize`, "
                                         "else fp32)")
    kernels: Literal["auto", "portable", "avx2", "avx512"] = Field(
        "auto", description="the decode kernels' code path (auto: the best the CPU reports; every path gives "
        "the same text)")
    admin_key: SecretStr | None = Field(None, description="enables /admin/models/...: send Authorization: "
                                        "Bearer <admin key> (a key of its own, not the API key)")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    max_length: int = Field(_LIMITS.max_length, ge=1, description="characters generated per request, at most")
    max_seed_chars: int = Field(_LIMITS.max_seed_chars, ge=1, description="characters of seed text per request")
    max_score_chars: int = Field(_LIMITS.max_score_chars, ge=2, description="characters of text per POST /score")
    max_batch: int = Field(_LIMITS.max_batch, ge=1, le=1024, description="requests decoded together in one step")
    max_queue: int = Field(_LIMITS.max_queue, ge=1, description="requests waiting before new ones get 429")
    request_timeout: float = Field(60.0, gt=0, description="seconds a request may take before it ends")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="larger request bodies get 413")
    body_timeout: float = Field(30.0, gt=0, le=3600,
                                description="seconds from a request's head to the end of its body, else 408")
    # A log-probability costs ~40 bytes in the engine (CharLogprob) until its response is sent
    # (benchmarks/memory.py measures the worst accepted request against the Deployment's 768 MiB).
    max_logprob_values: int = Field(262_144, ge=1, description="log-probabilities one response may carry "
                                    "(characters x choices x (1 + alternatives)); more is a 400")
    max_logprob_values_held: int = Field(1_048_576, ge=1, description="log-probabilities held for all responses "
                                         "not yet sent; a request that would pass it gets 429")
    stream_interval_ms: int = Field(50, ge=0, le=1000, description="a stream sends at most one text event per this")
    api_key: SecretStr | None = Field(None, description="when set, requests need Authorization: Bearer <key>")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: PyTorch's choice)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    drain_seconds: float = Field(1.0, ge=0, le=3600, description="after SIGTERM, /ready is 503 this long first")
    grace_seconds: float = Field(30.0, ge=0, le=3600, description="then in-flight requests get this long to finish")
    # Connections (uvicorn's own limits; a production deployment also sits behind a proxy or ingress).
    limit_concurrency: int = Field(1000, ge=1, description="open connections + requests before new ones get 503")
    backlog: int = Field(2048, ge=1, description="connections the OS queues before accepting them")
    timeout_keep_alive: int = Field(5, ge=1, description="seconds an idle keep-alive connection stays open")
    header_timeout: float = Field(10.0, gt=0, le=3600,
                                  description="seconds a connection may take to send a request's head")
    send_timeout: float = Field(60.0, gt=0, le=3600,
                                description="seconds a response may wait for its client to read before it is cut off")

    @field_validator("kernels")
    @classmethod
    def _kernels_run_here(cls, isa: str) -> str:
        """A forced code path this CPU cannot run fails the start, naming what it lacks."""
        kernels = native.load()
        if isa != "auto" and kernels is not None and isa not in kernels.available():
            kernels.use(isa)  # raises UnsupportedISA, which names the missing instructions
        if isa != "auto" and kernels is None:
            raise ValueError(f"CHARLM_KERNELS={isa} needs the native kernels, and charlm._native is not built "
                             "(no C compiler at install?): use auto")
        return isa

    @field_validator("api_key", "admin_key")
    @classmethod
    def _no_empty_key(cls, key: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        """An empty key would switch authentication off without anyone deciding so: refuse it."""
        if key is not None and not key.get_secret_value().strip():
            raise ValueError(f"CHARLM_{str(info.field_name).upper()} is set but empty: set a key, or unset it")
        return key

    @model_validator(mode="after")
    def _admin_key_is_its_own(self) -> Settings:
        """The API key is handed to every client; a shared one would let any client unload models."""
        if self.admin_key is not None and self.api_key is not None and (
                self.admin_key.get_secret_value() == self.api_key.get_secret_value()):
            raise ValueError("CHARLM_ADMIN_KEY must differ from CHARLM_API_KEY")
        return self

    @model_validator(mode="after")
    def _models_parse(self) -> Settings:
        self.model_sources()
        if self.default_model is not None and not MODEL_ID.fullmatch(self.default_model):
            raise ValueError(f"CHARLM_DEFAULT_MODEL {self.default_model!r} is not a model id "
                             f"(letters, digits, '.', '_', '-')")
        return self

    def model_sources(self) -> tuple[tuple[Path, ...], dict[str, Path]]:
        """(directories, id -> file) from CHARLM_MODELS and CHARLM_CHECKPOINT; ValueError naming a bad item."""
        directories: list[Path] = []
        files: dict[str, Path] = {}
        items = [i.strip() for i in (self.models or "").split(",") if i.strip()]
        for item in items:
            model_id, eq, path = item.partition("=")
            if not eq:
                directories.append(Path(item))
                continue
            if not MODEL_ID.fullmatch(model_id.strip()):
                raise ValueError(f"CHARLM_MODELS: {model_id.strip()!r} is not a model id (letters, digits, "
                                 "'.', '_', '-'; first a letter or digit)")
            files[model_id.strip()] = Path(path.strip())
        if self.checkpoint is not None:
            files.setdefault(model_id_for(self.checkpoint), self.checkpoint)
        if self.models is None and self.checkpoint is None:
            directories.append(MODELS_DIR)
        return tuple(directories), files

    def registry_config(self) -> RegistryConfig:
        directories, files = self.model_sources()
        default = self.default_model or (model_id_for(self.checkpoint) if self.checkpoint is not None else None)
        return RegistryConfig(directories=directories, files=files, default=default, device=self.device,
                              limits=self.limits(), max_loaded=self.max_loaded, keep_alive=self.keep_alive,
                              max_model_bytes=self.max_model_mb * 2**20, load_timeout=self.request_timeout,
                              prefix_cache_bytes=int(self.prefix_cache_mb * 2**20), weights=self.weights,
                              retire_grace=self.request_timeout)

    @model_validator(mode="after")
    def _held_covers_one(self) -> Settings:
        """A server that cannot hold one largest response would refuse it forever with a retryable 429."""
        largest = max(self.max_logprob_values, self.max_score_chars * (1 + MAX_LOGPROBS))  # a /score's too
        if self.max_logprob_values_held < largest:
            raise ValueError(f"CHARLM_MAX_LOGPROB_VALUES_HELD ({self.max_logprob_values_held}) must be at least "
                             f"CHARLM_MAX_LOGPROB_VALUES ({self.max_logprob_values}) and CHARLM_MAX_SCORE_CHARS x 6 "
                             f"({self.max_score_chars * (1 + MAX_LOGPROBS)})")
        return self

    def limits(self) -> EngineLimits:
        return EngineLimits(max_length=self.max_length, max_seed_chars=self.max_seed_chars,
                            max_batch=self.max_batch, max_queue=self.max_queue, max_score_chars=self.max_score_chars)

    @property
    def max_choices(self) -> int:
        """Choices one /v1/completions request may ask for (prompts x n): all of them can wait in the
        queue together and decode together."""
        return min(self.max_batch, self.max_queue)
