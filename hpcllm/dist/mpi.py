"""`mpi` backend: mpi4py on torch tensors, zero-copy on CPU.

Synchronous collectives call MPI directly on the tensor's memory (a numpy view, no copy), so a
16 MB allreduce costs what a raw `Allreduce(MPI.IN_PLACE, ...)` costs. Asynchronous allreduces run
on one communication thread with its own duplicated communicator: MPI progresses a blocking
Allreduce inside that thread while the main thread keeps computing the backward pass (torch and
mpi4py both release the GIL), which is real overlap — Open MPI's non-blocking collectives only
progress when the caller re-enters MPI. Each communicator is used by exactly one thread, in the
same order on every rank, so the collective ordering stays consistent.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch

from hpcllm.dist.comm import Communicator, Work, _check_op
from hpcllm.dist.watchdog import Watchdog
from hpcllm.dist.world import World


def _mpi():
    from mpi4py import MPI

    return MPI


class MPICommunicator(Communicator):
    name = "mpi"

    def __init__(self, world: World, device: torch.device, timeout_s: float, comm: Any = None):
        super().__init__(world, device, timeout_s)
        MPI = _mpi()
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self._ops = {"sum": MPI.SUM, "avg": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
        self._in_place = MPI.IN_PLACE
        self._async_comm = self.comm.Dup()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.watchdog = Watchdog(self.rank, self.size, timeout_s, mpi_comm=self.comm, abort=self.comm.Abort)

    # -- buffers ---------------------------------------------------------------------------
    @staticmethod
    def _host_view(tensor: torch.Tensor) -> tuple[np.ndarray, torch.Tensor | None]:
        """A numpy array sharing the tensor's memory, or a host copy (GPU, bf16, non-contiguous)
        together with the tensor to copy the result back into."""
        t = tensor.detach()
        if t.device.type == "cpu" and t.is_contiguous() and t.dtype != torch.bfloat16:
            return t.numpy(), None
        staging = t.to("cpu", torch.float32 if t.dtype in (torch.bfloat16, torch.float16) else t.dtype)
        return staging.contiguous().numpy(), tensor

    @staticmethod
    def _finish(arr: np.ndarray, back: torch.Tensor | None, op: str, size: int) -> None:
        if back is not None:
            back.copy_(torch.from_numpy(arr))
            if op == "avg":
                back.div_(size)
        elif op == "avg":
            arr /= size

    # -- collectives -----------------------------------------------------------------------
    def allreduce(self, tensor, op="sum", async_op=False):
        _check_op(op)
        what = f"allreduce {op}"
        arr, back = self._host_view(tensor)
        if not async_op:
            with self.blocking(what, tensor):
                self.comm.Allreduce(self._in_place, arr, op=self._ops[op])
            self._finish(arr, back, op, self.size)
            return None
        fut: Future = Future()
        self._submit((arr, self._ops[op], fut))

        def wait() -> None:
            fut.result()
            self._finish(arr, back, op, self.size)

        return Work(self, what, tensor, wait)

    def broadcast(self, tensor, src=0):
        arr, back = self._host_view(tensor)
        with self.blocking("broadcast", tensor):
            self.comm.Bcast(arr, root=src)
        if back is not None:
            back.copy_(torch.from_numpy(arr))

    def allgather_object(self, obj):
        with self.blocking("allgather_object"):
            return self.comm.allgather(obj)

    def broadcast_object(self, obj, src=0):
        with self.blocking("broadcast_object"):
            return self.comm.bcast(obj, root=src)

    def barrier(self):
        with self.blocking("barrier"):
            self.comm.Barrier()

    def close(self):
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        super().close()

    # -- the communication thread ----------------------------------------------------------
    def _submit(self, item: tuple) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="hpcllm-mpi-comm", daemon=True)
            self._thread.start()
        self._queue.put(item)

    def _serve(self) -> None:
        IN_PLACE = _mpi().IN_PLACE
        while True:
            item = self._queue.get()
            if item is None:
                return
            arr, mpi_op, fut = item
            try:
                self._async_comm.Allreduce(IN_PLACE, arr, op=mpi_op)
                fut.set_result(None)
            except Exception as e:  # surfaces in Work.wait() on the main thread
                fut.set_exception(e)
            del item, arr  # the buffer views a tensor: let the main thread hold its last reference
