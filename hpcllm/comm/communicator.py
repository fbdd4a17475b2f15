"""The one communicator interface every backend implements.

Collectives work in place on torch tensors. `allreduce(..., async_op=True)` returns a `Work` whose
`wait()` the caller must call before reading the tensor: that is what lets the gradient sync launch a
bucket's allreduce during the backward pass and await them all before the optimizer step.

The sharded collectives of ZeRO work on a flat buffer of `size * k` elements split rank-major into
`size` shards of k: `reduce_scatter(shard, full)` leaves in `shard` the reduction over ranks of the
caller's own part of `full` (rank r gets elements r*k .. (r+1)*k), and `all_gather(full, shard)`
leaves in `full` every rank's shard, in rank order. Both also take `async_op`.

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
ScatterOp = Literal["sum", "avg"]
SCATTER_OPS = ("sum", "avg")  # what every backend's reduce-scatter has (Horovod: only these two)
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
    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, op: ScatterOp = "sum",
                       async_op: bool = False) -> Work | None:
        """Reduce `input` (size*k elements, rank-major) across ranks and leave this rank's k
        elements of the result, input[rank*k:(rank+1)*k] reduced over ranks, in `output` (k
        elements). "avg" divides the sum by size. With async_op, returns a Work to wait() on."""

    @abstractmethod
    def all_gather(self, output: torch.Tensor, input: torch.Tensor, async_op: bool = False) -> Work | None:
        """Concatenate every rank's `input` (k elements) in rank order into `output` (size*k
        elements): output[r*k:(r+1)*k] is rank r's input. With async_op, returns a Work."""

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

    def reduce_scatter(self, output, input, op="sum", async_op=False):
        _check_shards("reduce_scatter", output, input, self.size, op)
        if output.data_ptr() != input.data_ptr():
            output.copy_(input)  # the sum or average over one rank: the input itself
        return Work(self, f"reduce_scatter {op}", input, lambda: None) if async_op else None

    def all_gather(self, output, input, async_op=False):
        _check_shards("all_gather", input, output, self.size)
        if output.data_ptr() != input.data_ptr():
            output.copy_(input)
        return Work(self, "all_gather", output, lambda: None) if async_op else None

    def broadcast(self, tensor, src=0):
        pass

    def allgather_object(self, obj):
        return [obj]

    def barrier(self):
        pass


def _check_op(op: str) -> None:
    if op not in REDUCE_OPS:
        raise ValueError(f"unknown reduce op {op!r}; expected one of {REDUCE_OPS}")


def _check_shards(what: str, shard: torch.Tensor, full: torch.Tensor, size: int, op: str | None = None) -> None:
    """Arguments of the sharded collectives: `full` holds size * shard.numel() elements, both flat
    (1-D), contiguous, of one dtype; reduce-scatter ops are sum and avg."""
    if op is not None and op not in SCATTER_OPS:
        raise ValueError(f"{what}: unknown reduce op {op!r}; expected one of {SCATTER_OPS}")
    io = ("output", "input") if what == "reduce_scatter" else ("input", "output")  # (shard, full)
    if shard.numel() * size != full.numel():
        raise ValueError(
            f"{what}: {io[1]} has {full.numel()} elements, {io[0]} {shard.numel()}; with {size} ranks "
            f"{io[1]} must have size * {io[0]} elements = {size * shard.numel()}"
        )
    for name, t in zip(io, (shard, full)):
        if t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"{what}: {name} must be a flat contiguous tensor; got shape {tuple(t.shape)}"
                             f"{'' if t.is_contiguous() else ', not contiguous'}")
    if shard.dtype != full.dtype:
        raise ValueError(f"{what}: dtypes differ: {io[0]} is {str(shard.dtype)[6:]}, {io[1]} {str(full.dtype)[6:]}")
