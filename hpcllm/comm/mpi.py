"""`mpi` backend: mpi4py on torch tensors, zero-copy on CPU.

Synchronous collectives call MPI directly on the tensor's memory (a numpy view, no copy), so a
16 MB allreduce costs what a raw `Allreduce(MPI.IN_PLACE, ...)` costs.

Asynchronous collectives (allreduce, and ZeRO's reduce_scatter / all_gather) overlap with the
backward pass in one of two ways:
- CPU tensors (zero-copy): a non-blocking `Iallreduce` (`Ireduce_scatter_block`, `Iallgather`)
  started from the caller's thread, advanced by `progress()` — the gradient sync calls it from
  every gradient hook — and completed in `Work.wait()`. Open MPI only progresses a non-blocking collective when the caller re-enters MPI,
  hence the calls from the hooks. No thread waits in a busy loop: on CPU every core is computing,
  and a spinning communication thread would take one from the backward pass (measured: ~8% of the
  step on 2 ranks of a 2-core machine).
- Tensors that need a host copy (GPU, bf16): one communication thread runs the blocking collective
  (Allreduce, Reduce_scatter_block, Allgather) per bucket, in submission order, while the main
  thread keeps computing (torch and mpi4py release the GIL); the host cores of a GPU node are free,
  so its spinning costs nothing there. (An all-gather moves bits and does no arithmetic: a CPU
  bf16/fp16 tensor goes as its int16 view, zero-copy, by the non-blocking path.)
Each path has its own duplicated communicator, used by one thread, in the same order on every
rank, so the collective ordering stays consistent.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

import numpy as np
import torch

from hpcllm.comm.communicator import Communicator, Work, _check_op, _check_shards
from hpcllm.comm.watchdog import Watchdog
from hpcllm.comm.world import World


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
        self._async_comm = self.comm.Dup()  # the communication thread's
        self._nb_comm = self.comm.Dup()  # non-blocking collectives of the caller's thread
        self._pending: list = []  # their outstanding requests
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.watchdog = Watchdog(self.rank, self.size, timeout_s, mpi_comm=self.comm, abort=self.comm.Abort)

    # -- buffers ---------------------------------------------------------------------------
    @staticmethod
    def _host_view(tensor: torch.Tensor, bitwise: bool = False) -> tuple[np.ndarray, torch.Tensor | None]:
        """A numpy array sharing the tensor's memory, or a host copy (GPU, bf16, non-contiguous)
        together with the tensor to copy the result back into. `bitwise`: the collective only
        moves bits (all-gather), so a 16-bit float goes as its int16 view: zero-copy on CPU, and
        a 2-byte host copy rather than a float32 one otherwise."""
        t = tensor.detach()
        if bitwise and t.dtype in (torch.bfloat16, torch.float16):
            t = tensor = t.view(torch.int16)
        if t.device.type == "cpu" and t.is_contiguous() and t.dtype != torch.bfloat16:
            return t.numpy(), None
        staging = t.to("cpu", torch.float32 if t.dtype in (torch.bfloat16, torch.float16) else t.dtype)
        return staging.contiguous().numpy(), tensor

    @staticmethod
    def _finish(arr: np.ndarray, back: torch.Tensor | None, op: str = "", size: int = 1) -> None:
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
        if back is None:  # zero-copy: non-blocking, advanced by progress()
            req = self._nb_comm.Iallreduce(self._in_place, arr, op=self._ops[op])
            return self._nonblocking(what, tensor, req, lambda: self._finish(arr, back, op, self.size))
        mpi_op = self._ops[op]
        return self._threaded(what, tensor, lambda c: c.Allreduce(self._in_place, arr, op=mpi_op),
                              lambda: self._finish(arr, back, op, self.size))

    def reduce_scatter(self, output, input, op="sum", async_op=False):
        _check_shards("reduce_scatter", output, input, self.size, op)
        what = f"reduce_scatter {op}"
        send, staged = self._host_view(input)
        recv, back = self._host_view(output)
        mpi_op = self._ops[op]
        if not async_op:
            with self.blocking(what, input):
                self.comm.Reduce_scatter_block(send, recv, op=mpi_op)
            self._finish(recv, back, op, self.size)
            return None
        if staged is None and back is None:  # zero-copy: non-blocking, advanced by progress()
            req = self._nb_comm.Ireduce_scatter_block(send, recv, op=mpi_op)
            return self._nonblocking(what, input, req, lambda: self._finish(recv, back, op, self.size))
        return self._threaded(what, input, lambda c: c.Reduce_scatter_block(send, recv, op=mpi_op),
                              lambda: self._finish(recv, back, op, self.size))

    def all_gather(self, output, input, async_op=False):
        _check_shards("all_gather", input, output, self.size)
        send, staged = self._host_view(input, bitwise=True)
        recv, back = self._host_view(output, bitwise=True)
        if not async_op:
            with self.blocking("all_gather", output):
                self.comm.Allgather(send, recv)
            self._finish(recv, back)
            return None
        if staged is None and back is None:  # zero-copy: non-blocking, advanced by progress()
            req = self._nb_comm.Iallgather(send, recv)
            return self._nonblocking("all_gather", output, req, lambda: self._finish(recv, back))
        return self._threaded("all_gather", output, lambda c: c.Allgather(send, recv),
                              lambda: self._finish(recv, back))

    def _nonblocking(self, what: str, tensor: torch.Tensor, req: Any, finish: Callable[[], None]) -> Work:
        """The Work of a request started on self._nb_comm: progress() advances it until waited."""
        self._pending.append(req)

        def wait_request() -> None:
            req.Wait()
            self._pending = [r for r in self._pending if r is not req]
            finish()

        return Work(self, what, tensor, wait_request)

    def _threaded(self, what: str, tensor: torch.Tensor, run: Callable[[Any], None],
                  finish: Callable[[], None]) -> Work:
        """The Work of a collective `run(comm)` that the communication thread performs."""
        fut: Future = Future()
        self._submit((run, fut))

        def wait() -> None:
            fut.result()
            finish()

        return Work(self, what, tensor, wait)

    def progress(self):
        if self._pending:
            _mpi().Request.Testall(self._pending)

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
        """Run the submitted collectives one at a time, in order, on the thread's own communicator.
        An item is (run, future): run(comm) performs one blocking collective on its buffers."""
        while True:
            item = self._queue.get()
            if item is None:
                return
            run, fut = item
            error = None
            try:
                run(self._async_comm)
            except Exception as e:  # surfaces in Work.wait() on the main thread
                error = e
            # the buffers may view a tensor: drop them before the main thread can return from
            # wait() and let go of its references, so that it, not this thread, frees the tensor
            del item, run
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)
            del error
