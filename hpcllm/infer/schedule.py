"""Which input shard a rank does next.

`static`: shard todo[i] goes to rank i % N, no communication. `dynamic`: whichever rank is free
takes the next shard, which balances shards of unequal cost (with parallel.tp, whichever
tensor-parallel group is free: its first rank asks, and tells the group). Dynamic works on every
backend:

- when MPI launched the job (mpirun, srun --mpi=pmix) — whatever dist.backend is — a coordinator
  thread on rank 0 answers the other ranks' requests over a private duplicate of MPI's world, and
  rank 0's own loop takes shards from the same list directly;
- otherwise (torchrun) every rank draws the next index from an atomic counter in torch.distributed's
  key-value store.

No wait here is unbounded, and none happens on the way out of an error: a request unanswered within
dist.timeout_s raises (exit 4), the coordinator polls so that it can be stopped, and a rank that
fails abandons the queue instead of joining it, so the error reaches the CLI, which reports it and
ends every rank (MPI_Abort; torchrun stops the other workers when one fails).
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from typing import Protocol

from hpcllm.comm import Communicator
from hpcllm.errors import CollectiveTimeout, DistError

log = logging.getLogger("hpcllm.infer")
_REQ, _REP = 7301, 7302
_POLL_S = 0.002  # a request waits at most this long for the coordinator to notice it


class ShardQueue(Protocol):
    description: str

    def next(self) -> int | None:
        """The next shard index for this rank, or None when there is none left."""

    def close(self) -> None:
        """After every rank's loop (the job's final collective): release the queue."""

    def abandon(self) -> None:
        """On an error: stop without waiting for any peer."""


def make_queue(comm: Communicator, todo: list[int], schedule: str, tp: int = 1, tp_group=None) -> ShardQueue:
    """Collective: every rank calls it at the same point with the same `todo`. With tp > 1 the
    ranks of a tensor-parallel group (adjacent ranks; `tp_group` their torch.distributed group) take
    the same shards: static, group i % groups; dynamic, the group's first rank takes the next shard
    from a queue among the groups' first ranks and tells the others."""
    groups = comm.size // tp
    if schedule == "static" or groups == 1:
        return StaticQueue(comm, todo, tp)
    world = _mpi_world(comm)
    import torch.distributed as tdist

    if world is not None:
        queue = MPIQueue(comm, todo, world, requesters=groups)
    elif tdist.is_available() and tdist.is_initialized():
        queue = StoreQueue(comm, todo)
    else:
        log.warning("infer.schedule=dynamic needs MPI or torch.distributed to hand out shards; running static")
        return StaticQueue(comm, todo, tp)
    return queue if tp == 1 else GroupQueue(queue, comm, tp, tp_group)


def _mpi_world(comm: Communicator):
    """MPI's world when MPI launched this job and can serve a thread beside the main one."""
    if not comm.world.mpi_launched or "mpi4py.MPI" not in sys.modules:
        return None
    from mpi4py import MPI

    if not MPI.Is_initialized() or MPI.Is_finalized() or MPI.COMM_WORLD.Get_size() != comm.size:
        return None
    if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        log.warning("MPI was initialised without MPI_THREAD_MULTIPLE: shards are handed out statically")
        return None
    return MPI.COMM_WORLD


class StaticQueue:
    description = "static (shard i to rank i % ranks)"

    def __init__(self, comm: Communicator, todo: list[int], tp: int = 1):
        self._mine = iter(todo[comm.rank // tp :: comm.size // tp])
        if tp > 1:
            self.description = f"static (shard i to tensor-parallel group i % {comm.size // tp}, {tp} ranks each)"

    def next(self) -> int | None:
        return next(self._mine, None)

    def close(self) -> None:
        pass

    def abandon(self) -> None:
        pass


class MPIQueue:
    description = "dynamic (rank 0 hands out shards over MPI)"

    def __init__(self, comm: Communicator, todo: list[int], world, requesters: int | None = None):
        """`requesters`: how many ranks take shards (every rank, or the first of each tp group; rank 0
        is always one of them)."""
        self.rank, self.size, self.timeout_s = comm.rank, comm.size, comm.timeout_s
        self.requesters = requesters or comm.size
        self.mpi = world.Dup()  # collective; a private channel that no other message can match
        self._pending = collections.deque(todo)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = None
        if self.rank == 0:
            self._thread = threading.Thread(target=self._serve, name="hpcllm-shard-queue", daemon=True)
            self._thread.start()

    def pending(self) -> int | None:
        """Shards not handed out yet (the queue's depth), known on rank 0 (hpcllm.monitor samples it)."""
        return len(self._pending) if self.rank == 0 else None

    def _take(self) -> int:
        with self._lock:
            return self._pending.popleft() if self._pending else -1

    def _serve(self) -> None:
        """Rank 0's coordinator: answer requests until every other rank has been told "no more".
        It polls (a blocking receive would spin a core in Open MPI and could not be stopped)."""
        from mpi4py import MPI

        status, finished = MPI.Status(), 0
        try:
            while finished < self.requesters - 1 and not self._stop.is_set():
                if not self.mpi.Iprobe(source=MPI.ANY_SOURCE, tag=_REQ, status=status):
                    time.sleep(_POLL_S)
                    continue
                src = status.Get_source()
                self.mpi.recv(source=src, tag=_REQ)
                nxt = self._take()
                finished += nxt < 0
                self.mpi.send(nxt, dest=src, tag=_REP)
        except BaseException as e:  # raised on rank 0's main thread at its next request
            self._error = e

    def next(self) -> int | None:
        if self.rank == 0:
            if self._error is not None:
                raise DistError(f"the shard queue's coordinator on rank 0 failed: {self._error!r}")
            nxt = self._take()
        else:
            self.mpi.send(self.rank, dest=0, tag=_REQ)
            deadline = time.monotonic() + self.timeout_s
            while not self.mpi.Iprobe(source=0, tag=_REP):
                if time.monotonic() > deadline:
                    raise CollectiveTimeout(f"rank {self.rank}: rank 0 did not hand out a shard within "
                                            f"dist.timeout_s={self.timeout_s:g} s")
                time.sleep(_POLL_S)
            nxt = self.mpi.recv(source=0, tag=_REP)
        return None if nxt < 0 else nxt

    def close(self) -> None:
        # every other rank has had its "no more" before it reached the final collective, so the
        # coordinator has ended or is about to
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s)
            if self._thread.is_alive() or self._error is not None:
                raise DistError(f"the shard queue's coordinator on rank 0 did not finish ({self._error!r})")
        self.mpi.Free()

    def abandon(self) -> None:
        self._stop.set()


class StoreQueue:
    description = "dynamic (an atomic counter in torch.distributed's store)"
    _instances = 0  # the same count on every rank: each queue gets its own counter key

    def __init__(self, comm: Communicator, todo: list[int]):
        from torch.distributed import distributed_c10d

        # the store every torch.distributed job rendezvoused through (TCPStore under torchrun); its
        # operations time out on their own (the process group's timeout)
        self.store = distributed_c10d._get_default_store()
        StoreQueue._instances += 1
        token = comm.broadcast_object(f"{time.time_ns()}" if comm.rank == 0 else None)
        self.key = f"hpcllm/shard-queue/{token}/{StoreQueue._instances}"
        self.todo = todo

    def next(self) -> int | None:
        i = self.store.add(self.key, 1) - 1
        return self.todo[i] if i < len(self.todo) else None

    def close(self) -> None:
        pass

    def abandon(self) -> None:
        pass


class GroupQueue:
    """parallel.tp > 1, dynamic: the first rank of each tensor-parallel group takes the next shard
    from `inner` (a queue among the groups' first ranks) and broadcasts it to its group, whose ranks
    then work on it together. A group waiting for its first rank waits as long as the process
    group's timeout (dist.timeout_s)."""

    def __init__(self, inner, comm: Communicator, tp: int, group):
        self.inner, self.group, self.tp = inner, group, tp
        self.first = comm.rank - comm.rank % tp  # the global rank that asks for the group
        self.asks = comm.rank == self.first
        self.description = f"{inner.description}; each shard to a tensor-parallel group of {tp} ranks"

    def next(self) -> int | None:
        import torch.distributed as tdist

        box = [self.inner.next() if self.asks else None]
        tdist.broadcast_object_list(box, src=self.first, group=self.group)
        return box[0]

    def pending(self) -> int | None:
        return getattr(self.inner, "pending", lambda: None)()

    def close(self) -> None:
        self.inner.close()

    def abandon(self) -> None:
        self.inner.abandon()
