"""Every setting of the service, from CHARLM_* environment variables, with defaults that serve models/."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "models" / "mysterious_island.safetensors"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHARLM_", extra="ignore")

    checkpoint: Path = Field(DEFAULT_CHECKPOINT, description="the .safetensors model to serve")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    max_length: int = Field(2000, ge=1, description="characters generated per request, at most")
    max_seed_chars: int = Field(10_000, ge=1, description="characters of seed text per request, at most")
    max_batch: int = Field(64, ge=1, le=1024, description="requests decoded together in one step")
    max_queue: int = Field(256, ge=1, description="requests waiting before new ones get 429")
    request_timeout: float = Field(60.0, gt=0, description="seconds a request may take before it ends")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="larger request bodies get 413")
    stream_interval_ms: int = Field(50, ge=0, le=1000, description="a stream sends at most one text event per this")
    api_key: SecretStr | None = Field(None, description="when set, requests need Authorization: Bearer <key>")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: PyTorch's choice)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    drain_seconds: float = Field(1.0, ge=0, description="after SIGTERM, /ready is 503 this long before closing")
    grace_seconds: float = Field(30.0, ge=0, description="after SIGTERM, in-flight requests get this long")
