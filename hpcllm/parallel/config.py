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
    # tensor parallel: each layer split over `tp` ranks (adjacent ranks: one node's fast links); the
    # data-parallel dimension is what remains of the world (ranks / tp). Needs dist.backend torch.
    tp: int = 1
    # with tp > 1: the output head's logits stay split by vocabulary and the loss is computed on the
    # parts (no rank holds batch x seq x vocab logits); false gathers the logits on every tp rank
    vocab_parallel: bool = True
    # with tp > 1: the activations between the layers split by sequence over the tp ranks instead of
    # replicated — the norms, dropout and residual adds run on 1/tp of the positions (their activation
    # memory / tp); an all-gather before attention and the MLP and a reduce-scatter after them replace
    # the allreduce (the same bytes). train.seq_len must be a multiple of tp
    sequence_parallel: bool = False

    def validate(self) -> None:
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("parallel.sequence_parallel=true needs parallel.tp > 1: it splits the sequence over "
                             "the tensor-parallel ranks")
        if self.tp > 1 and self.shard == "optimizer":
            raise ValueError("parallel.shard=optimizer with parallel.tp > 1 is not implemented: use shard none "
                             "(data parallel over ranks / tp) or full (FSDP2 over ranks / tp)")

    def data_parallel(self, world: int) -> int:
        """The data-parallel size of a world of `world` ranks, or a ValueError naming the field."""
        if world % self.tp:
            raise ValueError(f"parallel.tp={self.tp} does not divide the world of {world} rank(s): run on a multiple "
                             f"of {self.tp} ranks")
        return world // self.tp


def check_backend(pc: ParallelConfig, backend: str) -> None:
    """A mode on a backend that cannot carry it is a config-time error that names one that can."""
    if backend != "auto" and backend not in SHARD_BACKENDS[pc.shard]:
        raise ValueError(f"parallel.shard={pc.shard} needs dist.backend torch (FSDP2 runs on torch.distributed: "
                         f"NCCL on GPU, gloo on CPU), not {backend}")
    if pc.tp > 1 and backend not in ("auto", "torch"):
        raise ValueError(f"parallel.tp={pc.tp} needs dist.backend torch (DTensor runs on torch.distributed: NCCL "
                         f"on GPU, gloo on CPU), not {backend}")


def check_model(pc: ParallelConfig, model) -> None:
    """What tensor parallelism needs of a (resolved) ModelConfig: whole heads and MLP slices per rank."""
    if pc.tp == 1:
        return
    for name, value in (("n_head", model.n_head), ("n_kv_head", model.n_kv_head), ("ffn_dim", model.ffn_dim)):
        if value is not None and value % pc.tp:
            raise ValueError(f"parallel.tp={pc.tp} does not divide model.{name}={value}: each tensor-parallel rank "
                             "holds whole heads and an equal slice of the MLP")
