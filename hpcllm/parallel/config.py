"""The `parallel` section of a job spec: how the model's state is spread over the ranks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# which backends can carry each mode (dist.backend); `auto` resolves to the first of them on CPU
SHARD_BACKENDS = {"none": ("mpi", "torch", "horovod", "single"), "optimizer": ("mpi", "torch", "horovod", "single"),
                  "full": ("torch", "single")}


@dataclass
class ParallelConfig:
    # none:      every rank holds the whole model, its gradients and optimizer state (data parallel)
    # optimizer: ZeRO-1 — each rank keeps and updates 1/N of the optimizer state; gradients are
    #            reduce-scattered and the updated parameters all-gathered (every backend)
    # full:      ZeRO-3 — parameters, gradients and optimizer state sharded with PyTorch's FSDP2,
    #            per transformer block (dist.backend torch: NCCL on GPU, gloo on CPU)
    shard: Literal["none", "optimizer", "full"] = "none"


def check_backend(shard: str, backend: str) -> None:
    """A mode on a backend that cannot carry it is a config-time error that names one that can."""
    if backend != "auto" and backend not in SHARD_BACKENDS[shard]:
        raise ValueError(f"parallel.shard={shard} needs dist.backend torch (FSDP2 runs on torch.distributed: "
                         f"NCCL on GPU, gloo on CPU), not {backend}")
