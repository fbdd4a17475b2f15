"""Tensor parallelism (`parallel.tp`) with PyTorch's DTensor: each family names its layers in
`CausalLM.tp_plan()` through the two helpers below, and `TensorParallelPlan` applies it with
`parallelize_module` on the mesh's `tp` dimension, composed with data parallelism over `dp`.

    column   a linear layer's output features split over the tp ranks (q/k/v, MLP up and gate):
             each rank computes its heads / its slice of the MLP from the whole input
    row      its input features split (attention output, MLP down): each rank's partial product
             is summed over the tp ranks (one allreduce per attention and per MLP)
    vocab    the token embedding split by vocabulary rows (each rank looks up its range, the
             ranks' lookups summed) and the output head by vocabulary columns; with
             `vocab_parallel` the logits stay split and the loss is computed on the parts
             (`loss_parallel`): no rank ever holds batch x seq x vocab logits

The norms, position embeddings and biases of row layers stay whole on every tp rank: their inputs
are the same on every tp rank, so are their gradients.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from hpcllm.comm import Communicator
from hpcllm.parallel.plans import FsdpPlan, Plan, tensor_bytes


def block_plan(column: tuple[str, ...], row: tuple[str, ...]) -> dict:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {**{name: ColwiseParallel() for name in column}, **{name: RowwiseParallel() for name in row}}


def vocab_plan(embedding: str, head: str, vocab_parallel: bool) -> dict:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {embedding: RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
            head: ColwiseParallel(output_layouts=Shard(-1) if vocab_parallel else Replicate(),
                                  use_local_output=not vocab_parallel)}


def split_model(model, tp_mesh, *, vocab_parallel: bool):
    """`model` split over `tp_mesh` in place by its family's plan (every rank must pass the same whole
    model: the same seed, or the same weights loaded)."""
    from torch.distributed.tensor.parallel import parallelize_module

    parallelize_module(model, tp_mesh, model.tp_plan(vocab_parallel))
    model.tie_weights()  # the embedding and the head are both split by vocabulary rows: one DTensor
    model.tp_size = tp_mesh.size()
    return model


def for_inference(model, comm: Communicator, tp: int):
    """The model split over groups of `tp` adjacent ranks for the inference engine: logits gathered
    on every rank of a group (each makes the same sampling decision from the same logits and the
    same per-record generator), the KV cache split by kv heads."""
    from hpcllm.parallel.plans import device_mesh

    return split_model(model, device_mesh(comm, tp)["tp"], vocab_parallel=False)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def average_gradients(grads: list[torch.Tensor], group, size: int) -> None:
    """Each gradient -> its mean over the `size` ranks of `group`, in one flat allreduce per dtype
    (their local parts, for DTensors)."""
    grads = [_local(g) for g in grads]
    for dtype in sorted({g.dtype for g in grads}, key=str):
        same = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, group=group)
        flat.div_(size)
        offset = 0
        for g in same:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()


def _replicas(t: torch.Tensor, world: int) -> int:
    """How many ranks hold each element of `t`: the world over the number of its distinct parts."""
    if not hasattr(t, "placements"):
        return world
    parts = 1
    for dim, placement in enumerate(t.placements):  # Shard, or FSDP2's _StridedShard over a tp-split dim
        if not placement.is_replicate():  # (a gradient is never Partial here: it has been reduced)
            parts *= t.device_mesh.size(dim)
    return world // parts


class TensorParallelPlan(Plan):
    """`parallel.tp > 1`: the model split over the mesh's `tp` dimension and replicated over `dp`
    (gradients averaged in one flat allreduce per dtype on the dp group), or, with parallel.shard
    full, sharded over `dp` with FSDP2 on top (2-D: dp x tp)."""

    comm_wait_s = 0.0  # the dp allreduce's time; the tp collectives are inside forward/backward

    def __init__(self, model, make_optimizer, comm: Communicator, mesh, *, vocab_parallel: bool, fsdp: bool,
                 bf16: bool):
        split_model(model, mesh["tp"], vocab_parallel=vocab_parallel)
        self.model, self.comm, self.mesh = model, comm, mesh
        self.tp, self.dp = mesh["tp"].size(), mesh["dp"].size()
        self.dp_group = mesh["dp"].get_group()
        self.vocab_parallel = vocab_parallel
        self.fsdp = None
        if fsdp and self.dp > 1:
            self.fsdp = FsdpPlan(model, make_optimizer, comm, bf16, mesh=mesh["dp"])
            self.optimizer = self.fsdp.optimizer
        else:
            self.optimizer = make_optimizer(model)
        self.mode = "full" if self.fsdp else "none"
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.comm_wait_s = 0.0

    def loss_context(self):
        if not self.vocab_parallel:
            return contextlib.nullcontext()
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()

    @contextlib.contextmanager
    def no_sync(self):
        if self.fsdp is None:  # gradients are only averaged in finish()
            yield
        else:
            with self.fsdp.no_sync():
                yield

    def finish(self) -> None:
        """Gradients -> their mean over the dp ranks, in one flat buffer per dtype (FSDP2 has
        reduce-scattered them already)."""
        if self.dp == 1 or self.fsdp is not None:
            return
        import time

        t0 = time.perf_counter()
        average_gradients([p.grad for p in self.params if p.grad is not None], self.dp_group, self.dp)
        self.comm_wait_s += time.perf_counter() - t0

    def clip_grad_norm(self, max_norm: float) -> None:
        """The norm of the whole model's gradient from every rank's parts: each part's squares
        divided by the number of ranks holding the same part, summed over the world (one allreduce)."""
        world = self.comm.size
        sq = torch.zeros((), device=self.comm.device, dtype=torch.float32)
        grads = [p.grad for p in self.params if p.grad is not None]
        for g in grads:
            sq += _local(g).float().pow(2).sum() / _replicas(g, world)
        dist.all_reduce(sq)
        coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for g in grads:
            _local(g).mul_(coef.to(_local(g).dtype))

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def same_start(self) -> None:
        pass  # every rank built the same whole model (same seed, or the same model.init) before splitting it

    def grads_bytes(self) -> int:
        return sum(tensor_bytes(p) for p in self.params)  # a gradient is held like its parameter
