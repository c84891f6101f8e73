"""Data-parallel training across the processes torchrun starts: which process this is, and the few
collectives the trainer needs besides DDP's gradient averaging.

torchrun (PyTorch's own launcher) starts one process per CPU share or GPU and tells each its place
in RANK, WORLD_SIZE and LOCAL_RANK. Without them this is one process, and nothing here talks to
anyone: a plain `charlm train` never opens a process group.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType, TracebackType

import torch
from torch import distributed as dist

__all__ = ["World", "process_group", "StopSignals", "all_max", "all_sum", "all_rows", "barrier"]

TIMEOUT = timedelta(minutes=30)
"""How long a rank waits in a collective: the others wait this long while rank 0 evaluates and saves."""


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0  # 0 evaluates and writes every file
    size: int = 1  # processes in the run (WORLD_SIZE)
    local_rank: int = 0  # this process's index on its machine: its GPU

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> World:
        """torchrun's RANK / WORLD_SIZE / LOCAL_RANK, or one process when WORLD_SIZE is unset."""
        if "WORLD_SIZE" not in env:
            return cls()
        try:
            world = cls(int(env.get("RANK", "0")), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
        except ValueError:
            raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers (torchrun sets them)") from None
        if world.size < 1 or not 0 <= world.rank < world.size or world.local_rank < 0:
            raise ValueError(f"RANK {world.rank} / WORLD_SIZE {world.size} / LOCAL_RANK {world.local_rank} "
                             "are inconsistent: RANK must be in [0, WORLD_SIZE)")
        return world

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def device(self, device: torch.device) -> torch.device:
        """One GPU per process: `cuda` means this process's LOCAL_RANK GPU under torchrun."""
        if device.type != "cuda" or not self.distributed:
            return device
        if device.index is not None:
            raise ValueError(f"device {device} names one GPU, but under torchrun each process uses the GPU of its "
                             "LOCAL_RANK; give --device cuda or auto")
        if self.local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {self.local_rank} has no GPU: this machine has "
                             f"{torch.cuda.device_count()}; start at most that many processes per node")
        return torch.device("cuda", self.local_rank)


@contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """Join the run's process group for the duration (gloo between CPU processes, NCCL between GPUs)."""
    if not world.distributed:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    yield
    # only after a run that ended well: destroying the group while another rank is still inside a
    # collective (because this one failed) can hang, and torchrun ends the others anyway
    dist.destroy_process_group()


_last_work: list[dist.Work] = []


def _wait(work: dist.Work | None) -> None:
    """Wait for a collective and hold its handle until the next one. Whoever drops a handle last frees
    its tensors, which takes the GIL; if that is one of gloo's threads while the interpreter is shutting
    down, the process aborts (SIGABRT after a finished run). Held here, the last one is freed by Python."""
    assert work is not None
    work.wait()
    _last_work[:] = [work]


def all_max(values: list[float], device: torch.device) -> list[float]:
    """Each value's largest across the ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    _wait(dist.all_reduce(t, op=dist.ReduceOp.MAX, async_op=True))
    return t.tolist()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum across the ranks (a new tensor; gloo has no AVG, so means divide this by the world size)."""
    t = t.detach().clone()
    _wait(dist.all_reduce(t, async_op=True))
    return t


def all_rows(t: torch.Tensor, dim: int, device: torch.device) -> torch.Tensor:
    """Every rank's `t`, concatenated along `dim` in rank order (on the CPU)."""
    local = t.detach().to(device).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    _wait(dist.all_gather(parts, local, async_op=True))
    return torch.cat(parts, dim=dim).cpu()


def barrier(world: World, device: torch.device) -> None:
    if world.distributed:
        _wait(dist.barrier(device_ids=[device.index] if device.type == "cuda" else None, async_op=True))


class StopSignals:
    """SIGINT and SIGTERM ask the run to stop at the next step, where the ranks agree on it.

    Raising KeyboardInterrupt inside a collective would leave the other ranks waiting there, so the
    first signal only sets `requested`; a second one interrupts at once. torchrun passes the signal
    it gets (Ctrl-C, or SIGTERM from Kubernetes) on to every worker and kills them 30 s later. The
    interrupted step may be half done, so the run then saves nothing: the last saved state stays.
    Handlers can only be set from the main thread; elsewhere this does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.forced = False  # a second signal: it raised KeyboardInterrupt wherever the run was
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _handle(self, _signum: int, _frame: FrameType | None) -> None:
        if self.requested:
            self.forced = True
            raise KeyboardInterrupt
        self.requested = True
