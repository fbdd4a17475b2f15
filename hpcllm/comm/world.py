"""Who am I? Rank, world size, local rank and node, read from whichever launcher started us.

Launchers set different variables; the first family found wins, in this order:
  mpirun (Open MPI)  OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}
  mpiexec (MPICH/Hydra, Intel MPI)  PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS
  torchrun           RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE
  srun (a job step)  SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, SLURM_NODEID
  nothing            a single process
Open MPI comes before Slurm because `mpirun` inside an sbatch script inherits the batch step's
SLURM_PROCID=0, which says nothing about the ranks mpirun starts.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    local_size: int
    node_rank: int
    hostname: str
    launcher: str  # openmpi | mpich | torchrun | srun | single

    @property
    def mpi_launched(self) -> bool:
        """Started so that MPI_Init finds its peers (mpirun/mpiexec, or srun with a PMI plugin)."""
        return self.launcher in ("openmpi", "mpich", "srun")


def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int | None:
    for n in names:
        v = env.get(n)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                pass
    return default


def detect_world(env: Mapping[str, str] | None = None) -> World:
    env = os.environ if env is None else env
    host = socket.gethostname()
    node = _int(env, "SLURM_NODEID", "GROUP_RANK", default=0)
    if "OMPI_COMM_WORLD_RANK" in env:
        return World(
            rank=_int(env, "OMPI_COMM_WORLD_RANK"),
            size=_int(env, "OMPI_COMM_WORLD_SIZE", default=1),
            local_rank=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", default=0),
            local_size=_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", default=1),
            node_rank=_int(env, "OMPI_COMM_WORLD_NODE_RANK", default=node),
            hostname=host,
            launcher="openmpi",
        )
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        return World(
            rank=_int(env, "PMI_RANK"),
            size=_int(env, "PMI_SIZE"),
            local_rank=_int(env, "MPI_LOCALRANKID", default=0),
            local_size=_int(env, "MPI_LOCALNRANKS", default=1),
            node_rank=node,
            hostname=host,
            launcher="mpich",
        )
    if "RANK" in env and "WORLD_SIZE" in env and "LOCAL_RANK" in env:
        return World(
            rank=_int(env, "RANK"),
            size=_int(env, "WORLD_SIZE"),
            local_rank=_int(env, "LOCAL_RANK"),
            local_size=_int(env, "LOCAL_WORLD_SIZE", default=1),
            node_rank=node,
            hostname=host,
            launcher="torchrun",
        )
    # SLURM_STEP_ID is set inside `srun` steps only; the batch script itself (SLURM_PROCID=0,
    # SLURM_NTASKS=n) is not one of the n tasks.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and "SLURM_STEP_NUM_TASKS" in env:
        return World(
            rank=_int(env, "SLURM_PROCID"),
            size=_int(env, "SLURM_STEP_NUM_TASKS"),
            local_rank=_int(env, "SLURM_LOCALID", default=0),
            local_size=_int(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", default=1),
            node_rank=node,
            hostname=host,
            launcher="srun",
        )
    return World(0, 1, 0, 1, 0, host, "single")


def check_srun_pmi(world: World, env: Mapping[str, str] | None = None) -> None:
    """Before MPI_Init: under srun, Open MPI only finds its peers through PMIx. Without it,
    MPI_Init either aborts with a page of text or every task runs as a world of one."""
    from hpcllm.errors import DistError

    env = os.environ if env is None else env
    if world.launcher != "srun" or world.size == 1 or "PMIX_RANK" in env:
        return
    plugin = "pmi2" if "PMI_FD" in env else "none"
    raise DistError(
        f"srun started {world.size} tasks without PMIx (srun --mpi={plugin}?): MPI cannot connect the "
        "tasks and every task would think it is rank 0. srun without --mpi=pmix? Debian's Open MPI needs "
        "`srun --mpi=pmix` (pmi2 and none fail): set MpiDefault=pmix in slurm.conf or keep "
        "--mpi=pmix in the job spec's slurm.srun_args."
    )


def check_mpi_agrees(world: World, mpi_rank: int, mpi_size: int) -> None:
    """Fail at start, with the likely cause, when MPI and the launcher disagree about the ranks."""
    from hpcllm.errors import DistError

    if (mpi_rank, mpi_size) == (world.rank, world.size):
        return
    if world.launcher == "srun" and mpi_size == 1 and world.size > 1:
        raise DistError(
            f"Slurm started {world.size} tasks but MPI sees a world of 1 on every task (task "
            f"{world.rank} thinks it is rank 0): srun without --mpi=pmix? Debian's Open MPI needs "
            "`srun --mpi=pmix` (pmi2 and none fail); set MpiDefault=pmix in slurm.conf or pass it "
            "in the job spec's slurm.srun_args."
        )
    raise DistError(
        f"rank/size disagree: launcher '{world.launcher}' says rank {world.rank} of {world.size}, "
        f"MPI says rank {mpi_rank} of {mpi_size}. Was the job started with a different MPI than "
        "mpi4py was built against, or with stale environment variables (e.g. mpirun inside srun)?"
    )
