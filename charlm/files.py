"""Atomic file writes, shared by the checkpoint writer, the trainer's resume state and the corpus cache.

It lives in its own module because it is a file utility, not part of the checkpoint format: the
trainer and the corpus cache need the same guarantees (a crash mid-write never leaves a broken file,
the result is readable by whoever the umask allows, killed writers leave no litter behind).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import socket
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "current_umask", "file_sha256"]


def current_umask() -> int:
    """The process umask, read without changing it where possible.

    /proc/self/status has it on Linux; elsewhere the only portable way is to set and restore it
    immediately (a tiny window in which another thread could create a file with umask 0).
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


@functools.lru_cache(maxsize=1)
def _writer_tag() -> str:
    """Which pid space the pid in a temporary file's name belongs to: hostname plus pid namespace.

    A container writing into a mounted directory has its own pids; without this tag the host could
    take a live container's pid for a dead local one and delete a temporary file still being written.
    """
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
    try:
        namespace = re.sub(r"\D", "", os.readlink("/proc/self/ns/pid"))
    except OSError:
        namespace = ""
    return f"{host}-{namespace}" if namespace else host


def _temp_prefix(path: Path, pid: int) -> str:
    """`.{name}.{tag}.{pid}.`: a temporary file's name says which target and which writer it belongs to."""
    return f".{path.name}.{_writer_tag()}.{pid}."


def _pid_alive(pid: int) -> bool:
    """True unless the process is certainly gone; a pid we may not signal belongs to a live process."""
    if pid <= 0:
        return True  # os.kill(0, …) and negative pids address process groups: never guess
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove_stale_temps(path: Path) -> None:
    """Delete temporary files for `path` left by writers of this pid space that were killed mid-write."""
    pattern = re.compile(rf"{re.escape(f'.{path.name}.{_writer_tag()}.')}(\d+)\.[a-z0-9_]+\.tmp")
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match and not _pid_alive(int(match.group(1))):
            try:
                entry.unlink()
            except OSError:
                pass  # another writer removed it first, or we may not: neither stops this write


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`.

    The file gets mode 0o666 & ~umask, like any file `open()` creates (mkstemp alone gives 0o600, so
    another user, e.g. a container's uid reading a mounted runs/, could not read a checkpoint).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path, os.getpid()), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of a file, read a MiB at a time (a model's version is its digest)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
