"""Rank detection from each launcher's environment, and the rank/size agreement check."""

import pytest

from hpcllm.comm.world import check_mpi_agrees, check_srun_pmi, detect_world
from hpcllm.errors import DistError


def test_single_process():
    w = detect_world({})
    assert (w.rank, w.size, w.local_rank, w.launcher) == (0, 1, 0, "single")


def test_openmpi_wins_over_inherited_slurm_batch_vars():
    env = {
        "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_NODE_RANK": "1",
        "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "12",
    }
    w = detect_world(env)
    assert (w.rank, w.size, w.local_rank, w.local_size, w.node_rank, w.launcher) == (3, 4, 1, 2, 1, "openmpi")


def test_mpich_and_torchrun():
    w = detect_world({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"})
    assert (w.rank, w.size, w.local_rank, w.launcher) == (1, 2, 1, "mpich")
    w = detect_world({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1"})
    assert (w.rank, w.size, w.local_rank, w.node_rank, w.launcher) == (5, 8, 1, 1, "torchrun")


def test_srun_step_but_not_batch_script():
    step = {"SLURM_PROCID": "1", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "1",
            "SLURM_NODEID": "0", "SLURM_NTASKS": "2"}
    w = detect_world(step)
    assert (w.rank, w.size, w.local_rank, w.launcher) == (1, 2, 1, "srun")
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"}
    assert detect_world(batch).launcher == "single"


def test_srun_without_pmix_is_diagnosed():
    w = detect_world({"SLURM_PROCID": "1", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2"})
    with pytest.raises(DistError, match="--mpi=pmix"):
        check_mpi_agrees(w, 0, 1)
    with pytest.raises(DistError, match="rank/size disagree"):
        check_mpi_agrees(w, 0, 3)
    check_mpi_agrees(w, 1, 2)


def test_srun_without_pmix_is_refused_before_mpi_init():
    w = detect_world({"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2"})
    with pytest.raises(DistError, match=r"srun --mpi=none\?"):
        check_srun_pmi(w, {})
    with pytest.raises(DistError, match=r"srun --mpi=pmi2\?"):
        check_srun_pmi(w, {"PMI_FD": "5"})
    check_srun_pmi(w, {"PMIX_RANK": "0"})
