"""The parallel layout of a run: one frozen object that owns the dimensions (dp, tp, pp and the
stages per pipeline rank), the shard mode they give, their checks, each rank's coordinates and the
device mesh. Everything else asks it (`layout.dp`, `layout.tp_enabled`, `layout.coordinates(rank)`,
`layout.build_mesh(comm)`) instead of working the arithmetic out again.

    world = pp x dp x tp        tp innermost (adjacent ranks: one node's fast links), pp outermost
    rank  = (pp_rank x dp + dp_rank) x tp + tp_rank

Torch is imported only where the mesh is built: `hpcllm config`, `plan` and `submit` check a layout
on a login node.

Adding a parallel dimension (e.g. context parallel, `cp`): a field here, its place in `mesh_shape`
and its checks in `of`; then one step of hpcllm.parallel.parallelize. See docs/parallelism.md.
"""

from __future__ import annotations

from dataclasses import dataclass

# which backends can carry each mode (dist.backend); `auto` resolves to the first of them on CPU
SHARD_BACKENDS = {"none": ("mpi", "torch", "horovod", "single"), "optimizer": ("mpi", "torch", "horovod", "single"),
                  "full": ("torch", "single")}


@dataclass(frozen=True)
class Layout:
    world: int
    tp: int = 1
    pp: int = 1
    shard: str = "none"  # parallel.shard as configured (`mode`: what it gives on this layout)
    virtual_stages: int = 1  # pipeline stages per pp rank
    pp_schedule: str = "1f1b"
    vocab_parallel: bool = True
    sequence_parallel: bool = False

    @classmethod
    def of(cls, pc, world: int) -> "Layout":
        """The layout of a ParallelConfig on `world` ranks, or a ValueError naming the field that
        does not divide the world."""
        for name, size in (("tp", pc.tp), ("pp", pc.pp)):
            if world % size:
                raise ValueError(f"parallel.{name}={size} does not divide the world of {world} rank(s): run on a "
                                 f"multiple of {size} ranks")
        if world % (pc.tp * pc.pp):
            raise ValueError(f"parallel.pp={pc.pp} x parallel.tp={pc.tp} does not divide the world of {world} "
                             f"rank(s): run on a multiple of {pc.pp * pc.tp} ranks")
        return cls(world, pc.tp, pc.pp, pc.shard, pc.virtual_stages, pc.pp_schedule, pc.vocab_parallel,
                   pc.sequence_parallel)

    # -- the dimensions ------------------------------------------------------------------------
    @property
    def dp(self) -> int:
        """The data-parallel size: what remains of the world after tp and pp."""
        return self.world // (self.tp * self.pp)

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def sp_enabled(self) -> bool:
        """Sequence parallel: the activations between the layers split by sequence over tp."""
        return self.sequence_parallel and self.tp_enabled

    @property
    def loss_parallel(self) -> bool:
        """The logits stay split by vocabulary over tp and the loss is computed on the parts."""
        return self.vocab_parallel and self.tp_enabled

    @property
    def mode(self) -> str:
        """The shard mode this layout gives: parallel.shard over the data-parallel ranks, `none`
        where there is one of them (nothing to shard)."""
        return self.shard if self.dp_enabled else "none"

    @property
    def fsdp_enabled(self) -> bool:
        return self.mode == "full"

    @property
    def zero1_enabled(self) -> bool:
        return self.mode == "optimizer"

    @property
    def builds_on_meta(self) -> bool:
        """Whether the parameters themselves are split (FSDP2 on several ranks, tensor parallelism,
        pipeline stages): then the model is built on the meta device and each rank materialises its part."""
        return self.tp_enabled or self.pp_enabled or (self.shard == "full" and self.world > 1)

    def bytes_per_param(self) -> float:
        """fp32 weights and gradients (8 bytes) and AdamW's two moments (8) per parameter, over the
        ranks that share them (tp x pp always; dp too for what parallel.shard shards)."""
        split, sharded_dp = self.tp * self.pp, self.dp if self.world > 1 else 1
        weights = 8 / (split * (sharded_dp if self.shard == "full" else 1))
        return weights + 8 / (split * (sharded_dp if self.shard in ("optimizer", "full") else 1))

    def describe(self) -> str:
        """The model-splitting dimensions as the trainer logs them: `tp=2 sequence_parallel pp=2 (1f1b)`."""
        schedule = self.pp_schedule + (f", {self.virtual_stages} stages per rank" if self.virtual_stages > 1 else "")
        return (f"tp={self.tp}{' sequence_parallel' if self.sp_enabled else ''} pp={self.pp}"
                + (f" ({schedule})" if self.pp_enabled else ""))

    # -- a rank's place ------------------------------------------------------------------------
    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of `rank`: tp innermost (adjacent ranks), then dp, pp outermost."""
        return rank // (self.dp * self.tp), (rank // self.tp) % self.dp, rank % self.tp

    def dp_rank(self, rank: int) -> int:
        """Which share of each global batch `rank` reads: the ranks of a tp group and of a pipeline
        (every stage) read the same batches."""
        return self.coordinates(rank)[1]

    def rng_stream(self, rank: int) -> int:
        """Whose random stream a rank continues when it cannot continue its own (a resume on another
        number of ranks): its data-parallel rank's — the ranks of a tp group must draw the same
        dropout masks — unless they hold different positions (sequence parallel): its own."""
        return rank if self.sp_enabled else self.dp_rank(rank)

    # -- the mesh ------------------------------------------------------------------------------
    def mesh_shape(self, named: bool = False) -> tuple[tuple[int, ...], tuple[str, ...] | None]:
        """(sizes, names) of the device mesh: 1-D over every rank, (dp, tp) with tp > 1, (pp, dp, tp)
        with pp > 1 — tp innermost, so the ranks of a tp group are adjacent (they share a node and
        its fast links), pp outermost. `named`: the (dp, tp) mesh even at tp=1, for the
        tensor-parallel path on groups of one rank (inference at tp=1, the bench's DTensor-overhead figure)."""
        if self.pp_enabled:
            return (self.pp, self.dp, self.tp), ("pp", "dp", "tp")
        if self.tp_enabled or named:
            return (self.dp, self.tp), ("dp", "tp")
        return (self.world,), None

    def build_mesh(self, comm, *, named: bool = False):
        """The DeviceMesh of this layout on torch.distributed (set up beside the job's own backend
        when that is mpi or horovod: gloo on CPU)."""
        from torch.distributed.device_mesh import init_device_mesh

        from hpcllm.comm.torch_group import ensure_process_group

        ensure_process_group(comm)
        shape, names = self.mesh_shape(named)
        return init_device_mesh(comm.device.type, shape, mesh_dim_names=names)


def device_mesh(comm, tp: int = 1, pp: int = 1, *, named: bool = False):
    """The DeviceMesh of `comm`'s world split (pp, dp, tp) as Layout.build_mesh does."""
    return Layout(comm.size, tp=tp, pp=pp).build_mesh(comm, named=named)


# -- the pipeline's stages: which layers each runs, which stages a pp rank runs (hpcllm.parallel.stages
# cuts the model by them, hpcllm.parallel.estimate counts a stage's parameters by them) -------------

def stage_layers(n_layer: int, n_stages: int) -> list[range]:
    """The layers of each stage: n_layer / n_stages each, the first n_layer % n_stages stages one more."""
    size, extra = divmod(n_layer, n_stages)
    out, start = [], 0
    for stage in range(n_stages):
        n = size + (stage < extra)
        out.append(range(start, start + n))
        start += n
    return out


def rank_stages(pp_rank: int, pp: int, virtual_stages: int = 1) -> list[int]:
    """The stages pp rank `pp_rank` runs, in order: pp_rank, pp_rank + pp, ... (V of them)."""
    return [chunk * pp + pp_rank for chunk in range(virtual_stages)]


# -- checks of a ParallelConfig against the rest of the spec (config time, no world needed) ----------

def interleaved_batches_ok(micro_batches: int, pp: int) -> bool:
    """PyTorch's ScheduleInterleaved1F1B runs the micro-batches in max(1, m // pp) rounds of equal
    size: m must be a multiple of that (m < 2 pp, or any multiple of pp, always is)."""
    return micro_batches % max(1, micro_batches // pp) == 0


def check_pipeline_batches(pc, train, accum: int, dp: int | None = None) -> None:
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


def check_backend(pc, backend: str) -> None:
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


def check_model(pc, model) -> None:
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
