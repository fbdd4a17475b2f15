"""`horovod` backend: Horovod's MPI controller (build it with scripts/build_horovod.sh).

Horovod runs its own background thread that fuses and reduces tensors; asynchronous allreduces map
to `allreduce_async_` handles, reduce_scatter / all_gather to `reducescatter_async` /
`allgather_async` ones (whose results are new tensors, copied into the caller's in `Work.wait()`).
Horovod is initialised on the same MPI world that mpi4py sees, so rank and size agree with the
launcher by construction and the watchdog can ask peers over MPI.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import torch

from hpcllm.comm.communicator import Communicator, Work, _check_op, _check_shards
from hpcllm.comm.watchdog import Watchdog
from hpcllm.comm.world import World
from hpcllm.errors import DistError


def import_horovod():
    try:
        import horovod.torch as hvd
    except ImportError as e:
        raise DistError(
            f"dist.backend=horovod but horovod.torch cannot be imported ({e}). Horovod 0.28.1 needs a "
            "patch to build against torch >= 2.1: run `scripts/build_horovod.sh` (see docs/install.md)."
        ) from None
    return hvd


class HorovodCommunicator(Communicator):
    name = "horovod"

    def __init__(self, world: World, device: torch.device, timeout_s: float, mpi_comm: Any = None):
        super().__init__(world, device, timeout_s)
        hvd = self.hvd = import_horovod()
        if mpi_comm is not None:
            hvd.init(comm=mpi_comm)
        else:
            hvd.init()
        if (hvd.rank(), hvd.size()) != (world.rank, world.size):
            raise DistError(
                f"horovod says rank {hvd.rank()} of {hvd.size()}, launcher says {world.rank} of {world.size}"
            )
        self._ops = {"sum": hvd.Sum, "avg": hvd.Average, "max": hvd.Max, "min": hvd.Min}
        # Horovod matches collectives across ranks by name and caches its negotiation per name, so
        # names must agree across ranks and repeat from step to step. A name is the tensor's
        # shape/dtype/op plus the lowest slot not used by such an op still in flight: program order
        # is the same on every rank, so the names agree, and a step's names repeat at the next step.
        self._in_flight: dict[str, set[int]] = {}
        self._names = itertools.count()
        abort = mpi_comm.Abort if mpi_comm is not None else None
        self.watchdog = Watchdog(self.rank, self.size, timeout_s, mpi_comm=mpi_comm, abort=abort)

    def _name(self, what: str) -> str:
        return f"hpcllm.{what}.{next(self._names)}"

    def _slot(self, key: str) -> tuple[str, Callable[[], None]]:
        """The name of the next `key` collective (see _in_flight) and the function that frees its
        slot once it has completed."""
        busy = self._in_flight.setdefault(key, set())
        slot = next(i for i in itertools.count() if i not in busy)
        busy.add(slot)
        return f"hpcllm.{key}.{slot}", lambda: busy.discard(slot)

    def _run(self, what: str, tensor: torch.Tensor, handle: Any, release: Callable[[], None],
             async_op: bool, finish: Callable[[Any], None] | None = None) -> Work | None:
        """The Work of a Horovod handle (waited here unless async_op); `finish(result)` takes
        the collective's result (a new tensor for reducescatter / allgather) once it is there."""

        def wait() -> None:
            try:
                result = self.hvd.synchronize(handle)
            finally:
                release()
            if finish is not None:
                finish(result)

        work = Work(self, what, tensor, wait)
        if async_op:
            return work
        work.wait()
        return None

    def allreduce(self, tensor, op="sum", async_op=False):
        _check_op(op)
        name, release = self._slot(f"allreduce.{op}.{str(tensor.dtype)[6:]}.{tensor.numel()}")
        handle = self.hvd.allreduce_async_(tensor, op=self._ops[op], name=name)
        return self._run(f"allreduce {op}", tensor, handle, release, async_op)

    def reduce_scatter(self, output, input, op="sum", async_op=False):
        # Horovod 0.28.1's reducescatter: Sum and Average only (Max/Min/Adasum fail in the
        # background thread), no bfloat16 (bf16 goes through a float32 copy), splits dim 0 and
        # returns a new tensor, which wait() copies into `output`. "avg" is a Sum divided in that
        # copy: Horovod's Average multiplies by a float32 1/size, which on 3 ranks differs from the
        # quotient the other backends give in about a third of the elements (by one ulp).
        _check_shards("reduce_scatter", output, input, self.size, op)
        name, release = self._slot(f"reduce_scatter.{op}.{str(input.dtype)[6:]}.{input.numel()}")
        send = input.float() if input.dtype == torch.bfloat16 else input
        handle = self.hvd.reducescatter_async(send, name=name, op=self.hvd.Sum)

        def finish(result: torch.Tensor) -> None:
            if op == "avg":
                torch.div(result, self.size, out=output)
            else:
                output.copy_(result)

        return self._run(f"reduce_scatter {op}", input, handle, release, async_op, finish)

    def all_gather(self, output, input, async_op=False):
        # allgather concatenates dim 0 into a new tensor, which wait() copies into `output`; it has
        # no bfloat16 either, but moves bits only: 16-bit floats go as their int16 view
        _check_shards("all_gather", input, output, self.size)
        name, release = self._slot(f"all_gather.{str(input.dtype)[6:]}.{input.numel()}")
        bits = input.dtype in (torch.bfloat16, torch.float16)
        handle = self.hvd.allgather_async(input.view(torch.int16) if bits else input, name=name)

        def finish(result: torch.Tensor) -> None:
            (output.view(torch.int16) if bits else output).copy_(result)

        return self._run("all_gather", output, handle, release, async_op, finish)

    def broadcast(self, tensor, src=0):
        handle = self.hvd.broadcast_async_(tensor, root_rank=src, name=self._name("broadcast"))
        Work(self, "broadcast", tensor, lambda: self.hvd.synchronize(handle)).wait()

    def allgather_object(self, obj):
        with self.blocking("allgather_object"):
            return self.hvd.allgather_object(obj, name=self._name("allgather_object"))

    def barrier(self):
        with self.blocking("barrier"):
            self.hvd.barrier()

    def close(self):
        # No hvd.shutdown() here: in Horovod 0.28.1 (MPI controller) a rank whose peer has already
        # shut down can wait in shutdown forever — seen here in about 1 run in 6, with or without
        # a barrier first. Horovod shuts down at interpreter exit on its own (atexit).
        self.barrier()
        super().close()
