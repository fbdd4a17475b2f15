"""The `parallel` section of a job spec: how the model's state is spread over the ranks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# the pipeline schedules that run several stages per rank (parallel.pp_virtual_stages)
MULTI_STAGE = ("interleaved1f1b", "loopedbfs")
# which backends can carry each mode (dist.backend); `auto` resolves to the first of them on CPU
SHARD_BACKENDS = {"none": ("mpi", "torch", "horovod", "single"), "optimizer": ("mpi", "torch", "horovod", "single"),
                  "full": ("torch", "single")}


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

    def data_parallel(self, world: int) -> int:
        """The data-parallel size of a world of `world` ranks, or a ValueError naming the field."""
        for name, size in (("tp", self.tp), ("pp", self.pp)):
            if world % size:
                raise ValueError(f"parallel.{name}={size} does not divide the world of {world} rank(s): run on a "
                                 f"multiple of {size} ranks")
        if world % (self.tp * self.pp):
            raise ValueError(f"parallel.pp={self.pp} x parallel.tp={self.tp} does not divide the world of {world} "
                             f"rank(s): run on a multiple of {self.pp * self.tp} ranks")
        return world // (self.tp * self.pp)

    def coordinates(self, rank: int, world: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of `rank`: tp innermost (adjacent ranks), then dp, pp outermost."""
        dp = self.data_parallel(world)
        return rank // (dp * self.tp), (rank // self.tp) % dp, rank % self.tp

    def dp_rank(self, rank: int, world: int) -> int:
        """Which share of each global batch `rank` reads: the ranks of a tp group and of a pipeline
        (every stage) read the same batches."""
        return self.coordinates(rank, world)[1]

    def micro_batches(self, train, world: int) -> tuple[int, int]:
        """(data-parallel size, micro-batches per step) of `train` (a TrainConfig) on `world` ranks,
        or a ValueError naming the fields: the pipeline's micro-batches are the accumulation steps."""
        dp = self.data_parallel(world)
        accum = train.accumulation(dp)
        check_pipeline_batches(self, train, accum, dp)
        return dp, accum


def interleaved_batches_ok(micro_batches: int, pp: int) -> bool:
    """PyTorch's ScheduleInterleaved1F1B runs the micro-batches in max(1, m // pp) rounds of equal
    size: m must be a multiple of that (m < 2 pp, or any multiple of pp, always is)."""
    return micro_batches % max(1, micro_batches // pp) == 0


def check_pipeline_batches(pc: ParallelConfig, train, accum: int, dp: int | None = None) -> None:
    """1F1B keeps at most pp micro-batches in flight and needs at least that many per step; the
    interleaved schedule needs whole rounds of them."""
    if pc.pp == 1:
        return
    source = (f"train.global_batch_size={train.global_batch_size} / ({dp} data-parallel rank(s) x "
              f"train.batch_size={train.batch_size})" if train.global_batch_size else f"train.grad_accum={accum}")
    if pc.pp_schedule == "interleaved1f1b" and not interleaved_batches_ok(accum, pc.pp):
        fits = next(m for m in range(accum + 1, 2 * accum + 2) if interleaved_batches_ok(m, pc.pp))
        raise_to = (f"train.global_batch_size to {fits * dp * train.batch_size}" if train.global_batch_size and dp
                    else f"train.grad_accum to {fits}" if not train.global_batch_size else "train.global_batch_size")
        raise ValueError(f"parallel.pp={pc.pp} with pp_schedule interleaved1f1b needs the micro-batches per step to "
                         f"be a multiple of their rounds, max(1, micro-batches // pp) (PyTorch's "
                         f"ScheduleInterleaved1F1B), this run has {accum} ({source}): raise {raise_to} for {fits} "
                         f"micro-batches (any multiple of {pc.pp} works)")
    if pc.pp_schedule == "1f1b" and accum < pc.pp:
        raise ValueError(f"parallel.pp={pc.pp} with pp_schedule 1f1b needs at least {pc.pp} micro-batches per step, "
                         f"this run has {accum} ({source}): raise train.global_batch_size (or grad_accum) or lower "
                         "train.batch_size, or use parallel.pp_schedule=gpipe")


def check_backend(pc: ParallelConfig, backend: str) -> None:
    """A mode on a backend that cannot carry it is a config-time error that names one that can."""
    if backend != "auto" and backend not in SHARD_BACKENDS[pc.shard]:
        raise ValueError(f"parallel.shard={pc.shard} needs dist.backend torch (FSDP2 runs on torch.distributed: "
                         f"NCCL on GPU, gloo on CPU), not {backend}")
    if pc.tp > 1 and backend not in ("auto", "torch"):
        raise ValueError(f"parallel.tp={pc.tp} needs dist.backend torch (DTensor runs on torch.distributed: NCCL "
                         f"on GPU, gloo on CPU), not {backend}")
    if pc.pp > 1 and backend not in ("auto", "torch"):
        raise ValueError(f"parallel.pp={pc.pp} needs dist.backend torch (torch.distributed.pipelining sends the "
                         f"activations over torch.distributed: NCCL on GPU, gloo on CPU), not {backend}")


def check_model(pc: ParallelConfig, model) -> None:
    """What a (resolved) ModelConfig must allow: a layer or more per pipeline stage; whole heads and
    MLP slices per tensor-parallel rank."""
    if pc.pp > model.n_layer:
        raise ValueError(f"parallel.pp={pc.pp} is more than model.n_layer={model.n_layer}: each pipeline stage "
                         "holds one layer or more")
    if pc.pp > 1 and pc.pp * pc.virtual_stages > model.n_layer:
        raise ValueError(f"parallel.pp={pc.pp} x parallel.pp_virtual_stages={pc.virtual_stages} = "
                         f"{pc.pp * pc.virtual_stages} stages is more than model.n_layer={model.n_layer}: each "
                         "pipeline stage holds one layer or more; lower parallel.pp_virtual_stages")
    if pc.tp == 1:
        return
    for name, value in (("n_head", model.n_head), ("n_kv_head", model.n_kv_head), ("ffn_dim", model.ffn_dim)):
        if value is not None and value % pc.tp:
            raise ValueError(f"parallel.tp={pc.tp} does not divide model.{name}={value}: each tensor-parallel rank "
                             "holds whole heads and an equal slice of the MLP")
