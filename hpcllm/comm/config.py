"""The `dist` section of a job spec: how ranks talk to each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DistConfig:
    # auto: torch (NCCL) on GPU, mpi on CPU when mpi4py is importable, else single process
    backend: Literal["auto", "mpi", "torch", "horovod", "single"] = "auto"
    # a collective that has not completed after this many seconds aborts the job, naming the
    # ranks that did not arrive, instead of hanging until the Slurm time limit
    timeout_s: float = 600.0
    # cpu | cuda | auto (cuda:local_rank when a GPU is visible)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # gradient bucket size for the bucketed allreduce (MB); large buckets amortise latency on GPUs
    bucket_mb: float = 64.0
    # torch backend rendezvous port (0: rank 0 picks a free port and shares it over MPI/Slurm)
    port: int = 0

    def validate(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {self.bucket_mb}")
