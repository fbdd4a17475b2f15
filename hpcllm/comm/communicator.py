"""The one communicator interface every backend implements.

Collectives work in place on torch tensors. `allreduce(..., async_op=True)` returns a `Work` whose
`wait()` the caller must call before reading the tensor: that is what lets the gradient sync launch a
bucket's allreduce during the backward pass and await them all before the optimizer step.

Every blocking point (a synchronous collective, or `Work.wait`) is reported to the stall watchdog, so
a collective that never completes ends the job with the names of the ranks that did not arrive.

Collective tracing: with HPCLLM_LOG_LEVEL=debug every rank logs each collective it completes — its
number, kind, bytes and dtype, a label (e.g. the gradient bucket), how long it was in flight and
how long the caller was blocked on it — to its log (run_dir/logs/rank<N>.log) and stderr:

    DEBUG hpcllm.comm: #12 allreduce sum 4.00 MB float32 [bucket 1/3]: in flight 6.2 ms, blocked 0.4 ms
"""

from __future__ import annotations

import contextlib
import logging
import time
from abc import ABC, abstractmethod
from typing import Any, Callable, Iterator, Literal

import torch

from hpcllm.comm.watchdog import Watchdog
from hpcllm.comm.world import World

ReduceOp = Literal["sum", "avg", "max", "min"]
REDUCE_OPS = ("sum", "avg", "max", "min")
trace_log = logging.getLogger("hpcllm.comm")


class Work:
    """Handle of an asynchronous collective. `wait()` blocks until the tensor holds the result."""

    def __init__(self, comm: "Communicator", what: str, tensor: torch.Tensor | None, wait_fn: Callable[[], None]):
        self._comm, self._what, self._tensor, self._wait_fn = comm, what, tensor, wait_fn
        self._done = False
        self._launched = time.perf_counter()
        self.label = ""  # shown in the collective trace, e.g. "bucket 2/5"

    def wait(self) -> None:
        if self._done:
            return
        with self._comm.blocking(self._what, self._tensor, label=self.label, launched=self._launched):
            self._wait_fn()
        self._done = True


class Communicator(ABC):
    """rank/size/local_rank/device plus the collectives the trainer and the jobs need."""

    name: str = "?"

    def __init__(self, world: World, device: torch.device, timeout_s: float):
        self.world = world
        self.rank, self.size, self.local_rank = world.rank, world.size, world.local_rank
        self.device = device
        self.timeout_s = timeout_s
        self.watchdog: Watchdog | None = None  # set by the backend once it can talk to its peers
        self._traced = 0  # collectives traced so far (HPCLLM_LOG_LEVEL=debug)

    # -- collectives -----------------------------------------------------------------------
    @abstractmethod
    def allreduce(self, tensor: torch.Tensor, op: ReduceOp = "sum", async_op: bool = False) -> Work | None:
        """Reduce `tensor` in place across ranks. With async_op, returns a Work to wait() on."""

    @abstractmethod
    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Overwrite `tensor` on every rank with rank `src`'s, in place."""

    @abstractmethod
    def allgather_object(self, obj: Any) -> list[Any]:
        """Every rank's (small, picklable) object, in rank order, on every rank."""

    @abstractmethod
    def barrier(self) -> None: ...

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return self.allgather_object(obj if self.rank == src else None)[src]

    def exscan(self, value: int) -> tuple[int, int]:
        """(sum of `value` over lower ranks, total over all ranks): where my part starts and ends."""
        values = self.allgather_object(int(value))
        return sum(values[: self.rank]), sum(values)

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any rank (one small allreduce)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        self.allreduce(t, "max")
        return bool(t.item() > 0)

    def progress(self) -> None:
        """Let outstanding asynchronous collectives advance. The gradient sync calls it from its
        hooks during backward; backends whose collectives progress on their own (a thread, NCCL,
        gloo) have nothing to do."""

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()

    @contextlib.contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        """Mark a wait that is not a collective (e.g. for the data loader): the watchdog times it
        like one, and if it never ends, says that this rank is the one that is stuck."""
        if self.watchdog is None:
            yield
            return
        self.watchdog.enter(what, local=True)
        try:
            yield
        finally:
            self.watchdog.leave()

    # -- helpers for backends --------------------------------------------------------------
    @contextlib.contextmanager
    def blocking(self, what: str, tensor: torch.Tensor | None = None, *, label: str = "",
                 launched: float | None = None) -> Iterator[None]:
        """Mark a blocking point so the watchdog can time it (described only if it fires), and
        trace it at debug level."""
        tracing = trace_log.isEnabledFor(logging.DEBUG)
        t0 = time.perf_counter() if tracing else 0.0
        if self.watchdog is not None:
            self.watchdog.enter(what, tensor)
        try:
            yield
        finally:
            if self.watchdog is not None:
                self.watchdog.leave()
        if tracing:
            self._trace(what, tensor, label, launched, t0)

    def _trace(self, what: str, tensor: torch.Tensor | None, label: str, launched: float | None, t0: float) -> None:
        self._traced += 1
        t1 = time.perf_counter()
        size = "" if tensor is None else f" {tensor.numel() * tensor.element_size() / 2**20:.2f} MB {str(tensor.dtype)[6:]}"
        flight = f"in flight {(t1 - launched) * 1e3:.1f} ms, " if launched is not None else ""
        trace_log.debug("#%d %s%s%s: %sblocked %.1f ms", self._traced, what, size, f" [{label}]" if label else "",
                        flight, (t1 - t0) * 1e3)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} rank {self.rank}/{self.size} on {self.device}>"


class SingleProcess(Communicator):
    """World of one: every collective is the identity. Used when nothing launched us in parallel."""

    name = "single"

    def allreduce(self, tensor, op="sum", async_op=False):
        _check_op(op)
        return Work(self, "allreduce", tensor, lambda: None) if async_op else None

    def broadcast(self, tensor, src=0):
        pass

    def allgather_object(self, obj):
        return [obj]

    def barrier(self):
        pass


def _check_op(op: str) -> None:
    if op not in REDUCE_OPS:
        raise ValueError(f"unknown reduce op {op!r}; expected one of {REDUCE_OPS}")
