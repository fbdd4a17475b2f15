"""The plans whose parameters are parts — tensor-parallel DTensors (`parallel.tp`), and the
pipeline's stages (hpcllm.parallel.pipeline) built on the same base. The model arrives already split
by hpcllm.parallel.parallelize (its family's plan, hpcllm.parallel.families); the plan reduces the
gradients over the mesh's `dp` dimension: one flat allreduce per dtype after backward, ZeRO-1 over
the dp ranks (parallel.shard optimizer), or nothing (FSDP2 over dp, parallel.shard full).

Under sequence parallelism the norms' weights are Replicate DTensors whose gradients are partial
sums over the tp ranks (each saw its positions): `finish` sums them before anything reads them.
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.tensor import DTensor, Partial, Shard
from torch.distributed.tensor.parallel import loss_parallel

from hpcllm.comm import Communicator
from hpcllm.errors import TrainingError
from hpcllm.parallel.parts import (allreduce_flat, average_gradients, clip_parts, local_tensor, replicas,
                                   tensor_bytes)
from hpcllm.parallel.plans import Plan
from hpcllm.parallel.zero import Zero1Parts


class DTensorPlan(Plan):
    """What the plans whose parameters are DTensors (or a pipeline stage's parts) share: AdamW's own
    zero_grad, parts filled at materialisation, gradients held like their parameters, one finish and
    one clip — and, under parallel.shard optimizer, ZeRO-1 over the mesh's dp ranks (`self.zero`,
    Zero1Parts, made with the plan: the model is materialised by then)."""

    params: list[torch.nn.Parameter]
    sharded = False  # FSDP2 over dp: gradients reduce-scattered in backward
    vocab_parallel = False

    def _reduce_over_dp(self, mode: str, bucket_mb: float) -> None:
        """The gradient reduction over the dp ranks, chosen once: ZeRO-1 (each rank keeps and updates
        1/dp of every parameter's part: its rows on this tp rank), FSDP2's own (`sharded`), or the
        flat allreduce of finish()."""
        self.sharded = mode == "full" and self.dp > 1
        if mode == "optimizer" and self.dp > 1:
            named = list(self.model.named_parameters())
            if any(local_tensor(p.data).is_meta for _, p in named):
                raise TrainingError("internal: ZeRO-1 made before the model was materialised (its rows would be "
                                    "views of meta tensors)")
            copies = {p: replicas(p, self.tp) for _, p in named}  # the tp ranks holding the same part
            self.zero = Zero1Parts(named, self.comm.subgroup(self.dp_group), bucket_mb, self.optimizer, copies)
            self.optimizer = self.zero.optimizer
        self.mode = "full" if self.sharded else "optimizer" if self.zero is not None else "none"

    def loss_context(self):
        return loss_parallel() if self.vocab_parallel else contextlib.nullcontext()

    def _zero_layout(self, p):
        """(mesh, placements) of p's ZeRO-1 rows as a DTensor of the whole parameter: Shard(0) over
        dp of the tp part — strided when tp itself splits dim 0 (dp's rows within each tp part, the
        layout FSDP2 gives over tensor parallelism)."""
        from torch.distributed.tensor.placement_types import _StridedShard

        if not isinstance(p, DTensor):
            return self.mesh["dp"], [Shard(0)]
        over_dp = _StridedShard(0, split_factor=self.tp) if p.placements[0].is_shard(0) else Shard(0)
        return self.mesh["dp", "tp"], [over_dp, *p.placements]

    # -- after backward ------------------------------------------------------------------------
    reduces_after_backward = True

    def _reduce(self) -> None:
        """Gradients -> their mean over the dp ranks, in one flat buffer per dtype (FSDP2 has
        reduce-scattered them already), or this rank's rows of it (ZeRO-1); first each gradient in
        its parameter's layout, and a tied weight's parts summed (the pipeline)."""
        self._grads_like_params()
        self._sum_tied_grads()
        if self.zero is not None:
            self.zero.finish()
        elif self.dp > 1 and not self.sharded:
            average_gradients([p.grad for p in self.params if p.grad is not None], self.dp_group, self.dp)

    def _sum_tied_grads(self) -> None:
        """A weight held by two stages has two gradient parts (hpcllm.parallel.pipeline)."""

    def _grads_like_params(self) -> None:
        """Each gradient in its parameter's layout, before anything reads it: the Partial gradients
        of sequence parallelism's norms summed over tp (below), and a tp-split tied embedding's
        gradient — which comes back Replicate (the sum of its embedding and head uses) — cut to the
        parameter's part (locally: no communication)."""
        self._sum_partial_grads()
        for p in self.params:
            if isinstance(p, DTensor) and isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
                p.grad = p.grad.redistribute(p.device_mesh, p.placements)

    def _sum_partial_grads(self) -> None:
        """A parameter replicated over tp whose inputs were split by sequence (a norm under sequence
        parallelism) gets a Partial gradient: each rank's sum over its own positions. Summed over the
        tp group in one flat allreduce, each becomes the Replicate gradient of its parameter."""
        partial = [p for p in self.params if p.grad is not None and isinstance(p.grad, DTensor)
                   and any(pl.is_partial() for pl in p.grad.placements)]
        if not partial:
            return
        tp_mesh = self.mesh["tp"]
        odd = [p for p in partial if p.grad.placements != (Partial("sum"),) or p.grad.device_mesh != tp_mesh]
        if odd:  # never a silently wrong sum
            raise TrainingError(f"internal: a gradient with placements {odd[0].grad.placements} on mesh "
                                f"{odd[0].grad.device_mesh}: sequence parallelism gives Partial(sum) on the tp mesh")
        grads = [p.grad.to_local() for p in partial]
        allreduce_flat(grads, tp_mesh.get_group(), 1)
        for p, g in zip(partial, grads):
            p.grad = DTensor.from_local(g, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                        stride=p.stride())

    def _counted_elsewhere(self) -> set[int]:
        """ids of parameters whose gradient another rank counts in the norm (a tied weight's second side)."""
        return set()

    def _norm_ranks(self) -> int:
        """The ranks over which copies of a part are counted once in the norm."""
        return self.comm.size

    def clip_grad_norm(self, max_norm: float) -> None:
        """The norm of the whole model's gradient from every rank's parts: each part's squares
        divided by the number of ranks holding the same part (a dp replica or FSDP shard by
        `replicas`; a tied weight once), summed over the world in one allreduce."""
        skip = self._counted_elsewhere()
        if self.zero is not None:
            self.zero.clip_grad_norm(max_norm, skip={p for p in self.params if id(p) in skip})
            return
        ranks = self._norm_ranks()
        grads = [p.grad for p in self.params if p.grad is not None]
        clip_parts(grads, [(p.grad, ranks) for p in self.params if p.grad is not None and id(p) not in skip],
                   max_norm, self.comm.device)

    def zero_grad(self) -> None:
        if self.zero is None:
            self.optimizer.zero_grad(set_to_none=True)
        else:  # the rows' gradients are views of the ZeRO-1 buffers, refilled by the next finish()
            for p in self.params:
                p.grad = None

    def same_start(self) -> None:
        pass  # every rank filled its part from the same whole values (hpcllm.parallel.materialize)

    def grads_bytes(self) -> int:
        held = sum(tensor_bytes(p) for p in self.params)  # a gradient is held like its parameter
        return held + (self.zero.communication_bytes() if self.zero is not None else 0)


class TensorParallelPlan(DTensorPlan):
    """`parallel.tp > 1`: the model split over the mesh's `tp` dimension and replicated over `dp`
    (gradients averaged in one flat allreduce per dtype on the dp group), with parallel.shard
    optimizer its optimizer state sharded over `dp` (ZeRO-1: gradients reduce-scattered, parameters
    all-gathered), or with parallel.shard full all of it sharded over `dp` with FSDP2 on top (2-D: dp x tp)."""

    def __init__(self, model, optimizer, comm: Communicator, mesh, *, mode: str, bucket_mb: float,
                 vocab_parallel: bool, sequence_parallel: bool = False):
        self.model, self.optimizer, self.comm, self.mesh = model, optimizer, comm, mesh
        self.tp, self.dp = mesh["tp"].size(), mesh["dp"].size()
        self.dp_group, self.tp_group = mesh["dp"].get_group(), mesh["tp"].get_group()
        self.vocab_parallel, self.sequence_parallel = vocab_parallel, sequence_parallel
        self.params = [p for p in model.parameters() if p.requires_grad]  # (under FSDP2: its own, sharded over dp)
        self._reduce_over_dp(mode, bucket_mb)

    @property
    def reduces_after_backward(self) -> bool:
        return not self.sharded  # FSDP2 has reduce-scattered them, and summed the partial ones over tp

    @contextlib.contextmanager
    def no_sync(self):
        if not self.sharded:  # gradients are only averaged in finish()
            yield
            return
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)
