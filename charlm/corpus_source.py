"""A corpus given as a URL is downloaded once into a cache and then read like any local file."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from charlm.files import atomic_write
from charlm.text import CorpusError

__all__ = ["fetch_corpus", "default_cache_dir"]


def default_cache_dir() -> Path:
    return Path(os.environ.get("CHARLM_CACHE", Path.home() / ".cache" / "charlm"))


def fetch_corpus(source: str, cache_dir: str | Path | None = None, timeout: float = 60.0) -> Path:
    """A local path is returned as is; an http(s) URL is fetched unless already cached."""
    if not source.startswith(("http://", "https://")):
        return Path(source)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    name = source.rstrip("/").rsplit("/", 1)[-1] or "corpus"
    target = cache / f"{hashlib.sha256(source.encode()).hexdigest()[:16]}-{name}"
    if target.is_file():
        return target
    try:
        with urllib.request.urlopen(source, timeout=timeout) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as exc:
        raise CorpusError(f"could not download {source}: {exc}") from None
    atomic_write(target, data)
    return target
