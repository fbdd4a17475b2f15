"""The distributed runtime: who am I (`detect_world`), and the communicator every job talks through.

    comm = hpcllm.comm.init_comm(spec.dist)    # detects the launcher, checks it, picks the backend
    comm.allreduce(t, "avg"); comm.barrier(); comm.close()

Backends: `mpi` (mpi4py), `torch` (torch.distributed: NCCL on GPU, gloo on CPU), `horovod`, `single`.
`auto` picks torch/NCCL when the job has a GPU, mpi otherwise.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

from hpcllm.comm.config import DistConfig
from hpcllm.comm.world import World, check_mpi_agrees, check_srun_pmi, detect_world
from hpcllm.errors import DistError

if TYPE_CHECKING:
    import torch

    from hpcllm.comm.communicator import Communicator, SingleProcess, Work

__all__ = ["Communicator", "DistConfig", "SingleProcess", "Work", "World", "detect_world", "init_comm", "pick_device"]

log = logging.getLogger("hpcllm.comm")


def __getattr__(name: str):
    # torch is imported with the communicators, not with the package: the job spec's `dist` section
    # (hpcllm.comm.config) is read by commands that never communicate — `hpcllm config`, and the
    # batch script's last word (hpcllm.launch.finish), which must not spend seconds importing torch
    if name in ("Communicator", "SingleProcess", "Work"):
        from hpcllm.comm import communicator

        return getattr(communicator, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def pick_device(cfg: DistConfig, world: World) -> torch.device:
    import torch

    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DistError("dist.device=cuda but no CUDA device is visible (CUDA_VISIBLE_DEVICES, --gpus?)")
    n = torch.cuda.device_count()
    # one GPU per rank: either each rank sees all of the node's GPUs (pick local_rank), or Slurm
    # bound exactly one GPU to each task (--gpus-per-task / --gpu-bind), which is then cuda:0
    index = world.local_rank if n > 1 else 0
    if index >= n:
        raise DistError(
            f"rank {world.rank} (local rank {world.local_rank} on {world.hostname}) has no GPU of its own: "
            f"{n} visible, {world.local_size} ranks on this node"
        )
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def resolve_backend(cfg: DistConfig, device: torch.device) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "torch" if device.type == "cuda" else "mpi"


def mpi_comm_world(world: World):
    """Initialise MPI (mpi4py) when the launcher set one up, and check it agrees with the launcher."""
    if not world.mpi_launched:
        return None
    check_srun_pmi(world)
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise DistError(f"launched by {world.launcher} with {world.size} ranks but mpi4py is not importable: {e}")
    comm = MPI.COMM_WORLD
    check_mpi_agrees(world, comm.Get_rank(), comm.Get_size())
    return comm


def _abort_on_uncaught_exception(mpi_comm) -> None:
    """An exception on one rank must end the whole job: Open MPI's MPI_Finalize at interpreter exit
    waits for every other rank, so a rank that just dies of a traceback leaves its peers (and
    itself) hanging until the time limit. Print the traceback (stderr and the rank's log), give the
    launcher a moment to forward it, then MPI_Abort."""
    import time
    import traceback

    from hpcllm.log import to_rank_log

    def hook(etype, value, tb):
        # written to the process's own stderr, not through the previous hook: torch.distributed's
        # init_process_group wraps sys.excepthook and buffers its output in a StringIO until the
        # hook returns — which an MPI_Abort never lets happen, so the traceback was lost
        err = sys.__stderr__ or sys.stderr
        err.write("".join(traceback.format_exception(etype, value, tb)))
        err.flush()
        to_rank_log(f"uncaught exception on rank {mpi_comm.Get_rank()}", exc_info=(etype, value, tb))
        code = getattr(value, "exit_code", 1) if isinstance(value, Exception) else 1
        time.sleep(1.0)
        mpi_comm.Abort(code)

    sys.excepthook = hook


def init_comm(cfg: DistConfig | None = None) -> Communicator:
    from hpcllm.comm.communicator import SingleProcess

    cfg = cfg or DistConfig()
    world = detect_world()
    device = pick_device(cfg, world)
    backend = resolve_backend(cfg, device)
    mpi_comm = mpi_comm_world(world)
    if mpi_comm is not None and world.size > 1:
        _abort_on_uncaught_exception(mpi_comm)
    if backend == "single" or (world.size == 1 and backend == "mpi" and mpi_comm is None):
        if world.size != 1:
            raise DistError(f"dist.backend=single but the launcher started {world.size} ranks")
        comm: Communicator = SingleProcess(world, device, cfg.timeout_s)
    elif backend == "mpi":
        if mpi_comm is None:
            raise DistError(f"dist.backend=mpi needs an MPI launcher (mpirun or srun --mpi=pmix); got {world.launcher}")
        from hpcllm.comm.mpi import MPICommunicator

        comm = MPICommunicator(world, device, cfg.timeout_s, mpi_comm)
    elif backend == "torch":
        from hpcllm.comm.torchdist import TorchCommunicator

        comm = TorchCommunicator(world, device, cfg.timeout_s, mpi_comm, cfg.port)
    elif backend == "horovod":
        from hpcllm.comm.horovod import HorovodCommunicator

        comm = HorovodCommunicator(world, device, cfg.timeout_s, mpi_comm)
    else:  # the config loader already rejects other names
        raise DistError(f"unknown dist.backend {backend!r}")
    log.debug("rank %d/%d on %s: backend %s, device %s, pid %d", world.rank, world.size, world.hostname,
              comm.name, device, os.getpid())
    return comm
