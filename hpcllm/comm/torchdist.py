"""`torch` backend: torch.distributed, NCCL on GPU and gloo on CPU.

Users never set MASTER_ADDR/MASTER_PORT: under mpirun/srun rank 0 picks its hostname and a free port
and shares them over MPI; under torchrun the variables are already there; under srun without MPI
the first node of the step and a port derived from the job id are used.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
from typing import Any

import torch
import torch.distributed as tdist

from hpcllm.comm.communicator import Communicator, Work, _check_op, _check_shards
from hpcllm.comm.world import World
from hpcllm.errors import DistError


# The flat-tensor sharded collectives; gloo (CPU) has both natively, for bf16 too. torch 2.13 renamed
# them *_single, same signature, and deprecates the old names with a FutureWarning on every call.
_reduce_scatter = getattr(tdist, "reduce_scatter_single", None) or tdist.reduce_scatter_tensor
_all_gather = getattr(tdist, "all_gather_single", None) or tdist.all_gather_into_tensor


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def rendezvous(world: World, mpi_comm: Any = None, port: int = 0) -> tuple[str, int]:
    env = os.environ
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        return env["MASTER_ADDR"], int(env["MASTER_PORT"])
    if world.size == 1:
        return "127.0.0.1", port or _free_port()
    if mpi_comm is not None:
        addr = (socket.gethostname(), port or _free_port()) if world.rank == 0 else None
        return tuple(mpi_comm.bcast(addr, root=0))
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if nodelist:
        try:
            first = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30
            ).stdout.split()[0]
        except (OSError, subprocess.SubprocessError, IndexError) as e:
            raise DistError(f"cannot expand SLURM nodelist '{nodelist}' for the torch rendezvous: {e}") from None
        return first, port or 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
    raise DistError("torch backend: no MASTER_ADDR/MASTER_PORT, no MPI and no Slurm step to rendezvous through")


def release_gloo_work(wait_s: float = 0.1) -> None:
    """Give torch's communication threads the GIL so finished work objects are freed before
    destroy_process_group joins those threads (which it does without releasing the GIL)."""
    import gc
    import time

    gc.collect()
    time.sleep(wait_s)


class TorchCommunicator(Communicator):
    name = "torch"

    def __init__(self, world: World, device: torch.device, timeout_s: float, mpi_comm: Any = None, port: int = 0):
        super().__init__(world, device, timeout_s)
        addr, port = rendezvous(world, mpi_comm, port)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not tdist.is_initialized():
            tdist.init_process_group(
                backend=backend,
                init_method=f"tcp://{addr}:{port}",
                rank=world.rank,
                world_size=world.size,
                # torch's own timeout raises a bare traceback on one rank and leaves the others
                # hanging; leave it well behind our watchdog, which names the missing ranks
                timeout=datetime.timedelta(seconds=timeout_s * 2 + 60),
                device_id=device if device.type == "cuda" else None,
            )
        self.backend = backend
        self.group = None  # the world's (TorchSubgroup: one of its subgroups)
        self._ops = {"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX, "min": tdist.ReduceOp.MIN}
        from hpcllm.comm.watchdog import Watchdog

        abort = mpi_comm.Abort if mpi_comm is not None else None
        self.watchdog = Watchdog(self.rank, self.size, timeout_s, mpi_comm=mpi_comm, abort=abort)

    def allreduce(self, tensor, op="sum", async_op=False):
        _check_op(op)
        # gloo has no AVG; NCCL does, and doing it in the kernel saves a pass over the buffer
        native_avg = op == "avg" and self.backend == "nccl"
        red = tdist.ReduceOp.AVG if native_avg else self._ops["sum" if op == "avg" else op]
        what = f"allreduce {op}"
        if not async_op:
            with self.blocking(what, tensor):
                tdist.all_reduce(tensor, op=red, group=self.group)
            if op == "avg" and not native_avg:
                tensor.div_(self.size)
            return None
        handle = tdist.all_reduce(tensor, op=red, group=self.group, async_op=True)

        def wait() -> None:
            handle.wait()
            if op == "avg" and not native_avg:
                tensor.div_(self.size)

        return Work(self, what, tensor, wait)

    def reduce_scatter(self, output, input, op="sum", async_op=False):
        _check_shards("reduce_scatter", output, input, self.size, op)
        # as in allreduce: AVG in the NCCL kernel, a division afterwards on gloo (which has no AVG)
        native_avg = op == "avg" and self.backend == "nccl"
        red = tdist.ReduceOp.AVG if native_avg else tdist.ReduceOp.SUM
        what = f"reduce_scatter {op}"
        if not async_op:
            with self.blocking(what, input):
                _reduce_scatter(output, input, op=red, group=self.group)
            if op == "avg" and not native_avg:
                output.div_(self.size)
            return None
        handle = _reduce_scatter(output, input, op=red, group=self.group, async_op=True)

        def wait() -> None:
            handle.wait()
            if op == "avg" and not native_avg:
                output.div_(self.size)

        return Work(self, what, input, wait)

    def all_gather(self, output, input, async_op=False):
        _check_shards("all_gather", input, output, self.size)
        if not async_op:
            with self.blocking("all_gather", output):
                _all_gather(output, input, group=self.group)
            return None
        handle = _all_gather(output, input, group=self.group, async_op=True)
        return Work(self, "all_gather", output, handle.wait)

    def broadcast(self, tensor, src=0):
        with self.blocking("broadcast", tensor):
            tdist.broadcast(tensor, group=self.group, group_src=src)

    def allgather_object(self, obj):
        out: list[Any] = [None] * self.size
        with self.blocking("allgather_object"):
            tdist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self):
        with self.blocking("barrier"):
            tdist.barrier(group=self.group)

    def subgroup(self, group) -> "TorchSubgroup":
        """This communicator's collectives over `group`, a torch.distributed group of some of its ranks."""
        return TorchSubgroup(self, group)

    def close(self):
        # Leave together, then let gloo's worker threads drop their finished work: destroying a
        # work releases a Python object, which needs the GIL, while destroy_process_group joins
        # those threads *holding* the GIL — a deadlock seen here in about 1 run in 5 without this.
        self.barrier()
        super().close()
        if tdist.is_initialized():
            release_gloo_work()
            tdist.destroy_process_group()


class TorchSubgroup(TorchCommunicator):
    """The collectives of a TorchCommunicator over one of its torch.distributed subgroups (a mesh
    dimension's ranks, e.g. the data-parallel ranks under tensor or pipeline parallelism): rank and
    size within the group, timed by the parent's watchdog. It owns nothing: closing it closes nothing."""

    def __init__(self, parent: TorchCommunicator, group):
        Communicator.__init__(self, parent.world, parent.device, parent.timeout_s)
        self.group, self.backend, self._ops = group, parent.backend, parent._ops
        self.rank, self.size = tdist.get_rank(group), tdist.get_world_size(group)
        self.watchdog = parent.watchdog

    def close(self):
        pass
