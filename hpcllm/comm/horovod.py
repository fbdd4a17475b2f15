"""`horovod` backend: Horovod's MPI controller (build it with scripts/build_horovod.sh).

Horovod runs its own background thread that fuses and reduces tensors; asynchronous allreduces map
to `allreduce_async_` handles. Horovod is initialised on the same MPI world that mpi4py sees, so rank
and size agree with the launcher by construction and the watchdog can ask peers over MPI.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from hpcllm.comm.communicator import Communicator, Work, _check_op
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

    def allreduce(self, tensor, op="sum", async_op=False):
        _check_op(op)
        key = f"allreduce.{op}.{str(tensor.dtype)[6:]}.{tensor.numel()}"
        busy = self._in_flight.setdefault(key, set())
        slot = next(i for i in itertools.count() if i not in busy)
        busy.add(slot)
        handle = self.hvd.allreduce_async_(tensor, op=self._ops[op], name=f"hpcllm.{key}.{slot}")

        def wait() -> None:
            try:
                self.hvd.synchronize(handle)
            finally:
                busy.discard(slot)

        work = Work(self, f"allreduce {op}", tensor, wait)
        if async_op:
            return work
        work.wait()
        return None

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
