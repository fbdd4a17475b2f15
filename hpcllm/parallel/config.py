"""The `parallel` section of a job spec: how the model's state is spread over the ranks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hpcllm.parallel.layout import Layout, check_pipeline_batches

# the pipeline schedules that run several stages per rank (parallel.pp_virtual_stages)
MULTI_STAGE = ("interleaved1f1b", "loopedbfs")


@dataclass
class ParallelConfig:
    # none:      every rank holds the whole model, its gradients and optimizer state (data parallel)
    # optimizer: ZeRO-1 — each rank keeps and updates 1/N of the optimizer state; gradients are
    #            reduce-scattered and the updated parameters all-gathered (every backend; with tp or pp
    #            over the data-parallel ranks of each tensor-parallel part or pipeline stage)
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
    # pipeline parallel: the layers split into `pp` stages on `pp` ranks, each step's micro-batches
    # (train.accumulation) flowing through them (torch.distributed.pipelining). The outermost mesh
    # dimension: world = pp x dp x tp, rank = (pp_rank x dp + dp_rank) x tp + tp_rank
    pp: int = 1
    # gpipe: every micro-batch's forward, then every backward (activations of all micro-batches held);
    # 1f1b: one forward, one backward in the steady state (at most pp micro-batches' activations held);
    # interleaved1f1b: pp_virtual_stages stages per rank (rank r runs stages r, r + pp, ...), 1F1B over
    # them depth first: the bubble / pp_virtual_stages, for a little more activation memory and V
    # times the stage-to-stage sends;
    # loopedbfs: the same stages per rank, breadth first — every micro-batch through a rank's first
    # stage, then its next, ..., then the backwards in reverse: the same bubble, any number of
    # micro-batches, but every micro-batch's activations of every stage held (GPipe's, V times)
    pp_schedule: Literal["gpipe", "1f1b", "interleaved1f1b", "loopedbfs"] = "1f1b"
    # stages per rank: 2 or more under interleaved1f1b and loopedbfs (default 2), 1 otherwise;
    # pp x it <= n_layer
    pp_virtual_stages: int | None = None

    @property
    def virtual_stages(self) -> int:
        """Stages per pipeline rank: pp_virtual_stages, or its default for the schedule."""
        if self.pp_virtual_stages is not None:
            return self.pp_virtual_stages
        return 2 if self.pp_schedule in MULTI_STAGE else 1

    def validate(self) -> None:
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("parallel.sequence_parallel=true needs parallel.tp > 1: it splits the sequence over "
                             "the tensor-parallel ranks")
        if self.pp < 1:
            raise ValueError(f"pp must be >= 1, got {self.pp}")
        if self.pp_virtual_stages is not None and self.pp_virtual_stages < 1:
            raise ValueError(f"pp_virtual_stages must be >= 1, got {self.pp_virtual_stages}")
        if self.pp_schedule in MULTI_STAGE and self.virtual_stages < 2:
            raise ValueError(f"parallel.pp_virtual_stages={self.virtual_stages} with pp_schedule {self.pp_schedule}: "
                             "it runs 2 or more stages per rank (or use pp_schedule 1f1b for one)")
        if self.pp_schedule not in MULTI_STAGE and self.virtual_stages > 1:
            raise ValueError(f"parallel.pp_virtual_stages={self.virtual_stages} needs parallel.pp_schedule="
                             f"interleaved1f1b or loopedbfs: {self.pp_schedule} runs one stage per rank")

    def layout(self, world: int) -> Layout:
        """This section's layout on `world` ranks (hpcllm.parallel.layout), or a ValueError naming the field."""
        return Layout.of(self, world)

    def data_parallel(self, world: int) -> int:
        """The data-parallel size of a world of `world` ranks, or a ValueError naming the field."""
        return self.layout(world).dp

    def coordinates(self, rank: int, world: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of `rank` (Layout.coordinates)."""
        return self.layout(world).coordinates(rank)

    def dp_rank(self, rank: int, world: int) -> int:
        return self.layout(world).dp_rank(rank)

    def micro_batches(self, train, world: int) -> tuple[int, int]:
        """(data-parallel size, micro-batches per step) of `train` (a TrainConfig) on `world` ranks,
        or a ValueError naming the fields: the pipeline's micro-batches are the accumulation steps."""
        dp = self.data_parallel(world)
        accum = train.accumulation(dp)
        check_pipeline_batches(self, train, accum, dp)
        return dp, accum

