"""A torch.distributed process group beside the job's own backend, for the PyTorch engines that
need one whatever `dist.backend` is: torch.distributed.checkpoint (every rank writes its part of a
checkpoint) and DeviceMesh/DTensor (sharded optimizer state). On the `torch` backend it is the
job's own group; on `mpi` and `horovod` a gloo group is set up once, its address shared over MPI
(the same rendezvous as the torch backend's), and closed with `close_process_group`.
"""

from __future__ import annotations

import datetime

import torch.distributed as tdist

from hpcllm.comm.communicator import Communicator
from hpcllm.errors import DistError

_created = False  # by this module (not by the torch backend, which closes its own)


def ensure_process_group(comm: Communicator) -> None:
    global _created
    if tdist.is_initialized():
        return
    if comm.size == 1:
        raise DistError("internal: one rank needs no process group (checkpoints are written with no_dist)")
    if not comm.world.mpi_launched:
        raise DistError(f"dist.backend={comm.name}: a torch.distributed group for checkpoints and sharded state "
                        "needs an MPI launcher to rendezvous through (mpirun or srun --mpi=pmix)")
    from mpi4py import MPI

    from hpcllm.comm.torchdist import rendezvous

    addr, port = rendezvous(comm.world, MPI.COMM_WORLD)
    tdist.init_process_group(backend="gloo", init_method=f"tcp://{addr}:{port}", rank=comm.rank,
                             world_size=comm.size, timeout=datetime.timedelta(seconds=comm.timeout_s * 2 + 60))
    _created = True


def close_process_group(comm: Communicator) -> None:
    """Close the group this module created (collectively: every rank calls it)."""
    global _created
    if _created and tdist.is_initialized():
        from hpcllm.comm.torchdist import release_gloo_work

        tdist.barrier()
        release_gloo_work()
        tdist.destroy_process_group()
    _created = False
