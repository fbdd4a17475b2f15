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

With `parallel.sequence_parallel` (Korthikanti et al., 2022) the activations between the layers are
split by sequence instead of replicated: each tp rank runs the norms, dropout and residual adds on
its 1/tp of the positions. The embedding and the row layers reduce-scatter their partial sums to
sequence slices (instead of allreducing them), the input of attention and of the MLP is all-gathered
whole before their column layers (`sequence_plan`'s `gathered`), and the head all-gathers the final
norm's output. The norms' weights are then Replicate DTensors whose gradients are partial sums over
the tp ranks (each saw its positions): `TensorParallelPlan.finish` sums them before anything reads them.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleOutput, RowwiseParallel, SequenceParallel,
                                               loss_parallel, parallelize_module)
from torch.distributed.tensor.parallel.style import ParallelStyle

from hpcllm.comm import Communicator
from hpcllm.errors import TrainingError
from hpcllm.parallel.plans import FsdpPlan, Plan, local_tensor, tensor_bytes


def block_plan(column: tuple[str, ...], row: tuple[str, ...], *, sequence_parallel: bool = False) -> dict:
    """Column and row layers of a block; under sequence parallelism a row layer's partial sums are
    reduce-scattered to sequence slices instead of allreduced."""
    row_style = (lambda: RowwiseParallel(output_layouts=Shard(1))) if sequence_parallel else RowwiseParallel
    return {**{name: ColwiseParallel() for name in column}, **{name: row_style() for name in row}}


def vocab_plan(embedding: str, head: str, vocab_parallel: bool, *, sequence_parallel: bool = False) -> dict:
    """The token embedding (its lookups summed: whole, or reduce-scattered to sequence slices) and
    the output head (its input all-gathered from sequence slices under sequence parallelism)."""
    between = Shard(1) if sequence_parallel else Replicate()  # the activations between the layers
    return {embedding: RowwiseParallel(input_layouts=Replicate(), output_layouts=between),
            head: ColwiseParallel(input_layouts=between, output_layouts=Shard(-1) if vocab_parallel else Replicate(),
                                  use_local_output=not vocab_parallel)}


def sequence_plan(norms: tuple[str, ...] = (), gathered: tuple[str, ...] = (), sliced: tuple[str, ...] = ()) -> dict:
    """Sequence parallelism's own entries: `norms` run on this rank's sequence slice (their weights
    replicated), the first input of each `gathered` module (attention, MLP) is all-gathered whole
    before it runs, and the output of each `sliced` module (a whole-sequence value every rank computes
    alike, e.g. GPT-2's learned position embeddings) is cut to this rank's slice."""
    return {**{name: SequenceParallel() for name in norms}, **{name: GatherSequence() for name in gathered},
            **{name: PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1))
               for name in sliced}}


class GatherSequence(ParallelStyle):
    """All-gathers a module's first input from sequence slices (dim 1) into a Replicate DTensor,
    whatever other arguments the module takes (PrepareModuleInput needs a layout for each). It stays
    a DTensor: the column layers inside compute with it, so its gradient comes back as their partial
    sums over the tp ranks and is reduce-scattered to the slices — exact."""

    def _apply(self, module, device_mesh):
        def gather(_module, inputs):
            x = inputs[0]
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, device_mesh, (Shard(1),), run_check=False)
            return (x.redistribute(placements=(Replicate(),)), *inputs[1:])

        module.register_forward_pre_hook(gather)
        return module


def split_model(model, tp_mesh, *, vocab_parallel: bool, sequence_parallel: bool = False):
    """`model` split over `tp_mesh` in place by its family's plan: the same whole model on every rank
    (inference), or one on the meta device that hpcllm.parallel.materialize fills after (training)."""
    parallelize_module(model, tp_mesh, model.tp_plan(vocab_parallel, sequence_parallel))
    model.tie_weights()  # the embedding and the head are both split by vocabulary rows: one DTensor
    model.tp_size = tp_mesh.size()
    return model


def for_inference(model, comm: Communicator, tp: int):
    """(model, the tp group): the model split over groups of `tp` adjacent ranks for the inference
    engine — logits gathered on every rank of a group (each makes the same sampling decision from
    the same logits and the same per-record generator), the KV cache split by kv heads — and the
    torch.distributed group of this rank's tp ranks (the shard queue tells a group its shard)."""
    from hpcllm.parallel.plans import device_mesh

    tp_mesh = device_mesh(comm, tp, named=True)["tp"]  # named at tp=1 too: a group of one rank
    return split_model(model, tp_mesh, vocab_parallel=False), tp_mesh.get_group()


def _allreduce_flat(tensors: list[torch.Tensor], group, divide_by: int) -> None:
    """Sum `tensors` over `group` in place (then divide), in one flat buffer per dtype."""
    for dtype in sorted({t.dtype for t in tensors}, key=str):
        same = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in same])
        dist.all_reduce(flat, group=group)
        if divide_by != 1:
            flat.div_(divide_by)
        offset = 0
        for t in same:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()


def average_gradients(grads: list[torch.Tensor], group, size: int) -> None:
    """Each gradient -> its mean over the `size` ranks of `group`, in one flat allreduce per dtype
    (their local parts, for DTensors)."""
    _allreduce_flat([local_tensor(g) for g in grads], group, size)


def _replicas(t: torch.Tensor, world: int) -> int:
    """How many ranks hold each element of `t`: the world over the number of its distinct parts."""
    if not hasattr(t, "placements"):
        return world
    parts = 1
    for dim, placement in enumerate(t.placements):  # Shard, or FSDP2's _StridedShard over a tp-split dim
        if not placement.is_replicate():  # (a gradient is never Partial here: finish() has summed it)
            parts *= t.device_mesh.size(dim)
    return world // parts


def clip_parts(grads: list[torch.Tensor], counted: list[tuple[torch.Tensor, int]], max_norm: float, device) -> None:
    """Scale `grads` (plain tensors or DTensor parts) so that the whole model's gradient norm is at
    most `max_norm`. `counted`: the (gradient, ranks that hold copies of it) whose squares make up the
    norm — each element once over the world, summed in one allreduce."""
    sq = torch.zeros((), device=device, dtype=torch.float32)
    for g, ranks in counted:
        sq += local_tensor(g).float().pow(2).sum() / _replicas(g, ranks)
    dist.all_reduce(sq)
    coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for g in grads:
        local_tensor(g).mul_(coef.to(local_tensor(g).dtype))


class DTensorPlan(Plan):
    """What the plans whose parameters are DTensors (or a pipeline stage's parts) share: AdamW's own
    zero_grad, parts filled at materialisation, gradients held like their parameters — and, under
    parallel.shard optimizer, ZeRO-1 over the mesh's dp ranks (`self.zero`, Zero1Parts)."""

    params: list[torch.nn.Parameter]
    _zero = None
    _zero_pending = None  # (the optimizer of the whole parts, bucket_mb) until ZeRO-1 is made

    def _shard_optimizer(self, optimizer, bucket_mb: float) -> None:
        """ZeRO-1 over the dp ranks: each rank keeps and updates 1/dp of every parameter's part (its
        rows on this tp rank) — made at first use of `zero` or `optimizer`, since its rows are views
        of the parameters' storage and the plan is made on the meta device (materialize fills the
        parameters after)."""
        self._zero_pending = (optimizer, bucket_mb)

    @property
    def zero(self):
        if self._zero_pending is not None:
            from hpcllm.parallel.zero import Zero1Parts

            optimizer, bucket_mb = self._zero_pending
            named = list(self.model.named_parameters())
            if any(local_tensor(p.data).is_meta for _, p in named):
                raise TrainingError("internal: ZeRO-1 made before the model was materialised (its rows would be "
                                    "views of meta tensors)")
            copies = {p: _replicas(p, self.tp) for _, p in named}  # the tp ranks holding the same part
            self._zero = Zero1Parts(named, self.comm.subgroup(self.dp_group), bucket_mb, optimizer, copies)
            self._optimizer, self._zero_pending = self._zero.optimizer, None
        return self._zero

    @property
    def optimizer(self):
        """AdamW over the parameters, or under ZeRO-1 over this rank's rows of them."""
        return self._optimizer if self.zero is None else self.zero.optimizer

    @optimizer.setter
    def optimizer(self, optimizer) -> None:
        self._optimizer = optimizer

    def _zero_layout(self, p):
        """(mesh, placements) of p's ZeRO-1 rows as a DTensor of the whole parameter: Shard(0) over
        dp of the tp part — strided when tp itself splits dim 0 (dp's rows within each tp part, the
        layout FSDP2 gives over tensor parallelism)."""
        from torch.distributed.tensor.placement_types import _StridedShard

        if not isinstance(p, DTensor):
            return self.mesh["dp"], [Shard(0)]
        over_dp = _StridedShard(0, split_factor=self.tp) if p.placements[0].is_shard(0) else Shard(0)
        return self.mesh["dp", "tp"], [over_dp, *p.placements]

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
        _allreduce_flat(grads, tp_mesh.get_group(), 1)
        for p, g in zip(partial, grads):
            p.grad = DTensor.from_local(g, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                        stride=p.stride())

    def step(self) -> None:
        if self.zero is None:
            self.optimizer.step()
        else:  # this rank's rows updated, every rank's all-gathered into the parameters
            self.zero.step()

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

    def state_dict(self) -> dict:
        if self.zero is None:
            return super().state_dict()
        from hpcllm.parallel.plans import model_state, sharded_optim_state

        return {"model": model_state(self.model), "optim": sharded_optim_state(self.zero, self.model, self._zero_layout)}

    def load_state_dict(self, state: dict) -> None:
        if self.zero is None:
            return super().load_state_dict(state)
        from hpcllm.parallel.plans import adopt_sharded_optim_state

        adopt_sharded_optim_state(self.zero, self.model, state)


class TensorParallelPlan(DTensorPlan):
    """`parallel.tp > 1`: the model split over the mesh's `tp` dimension and replicated over `dp`
    (gradients averaged in one flat allreduce per dtype on the dp group), with parallel.shard
    optimizer its optimizer state sharded over `dp` (ZeRO-1: gradients reduce-scattered, parameters
    all-gathered), or with parallel.shard full all of it sharded over `dp` with FSDP2 on top (2-D: dp x tp)."""

    comm_wait_s = 0.0  # the dp allreduce's time; the tp collectives are inside forward/backward

    def __init__(self, model, make_optimizer, comm: Communicator, mesh, *, vocab_parallel: bool, mode: str,
                 bucket_mb: float, bf16: bool, sequence_parallel: bool = False):
        split_model(model, mesh["tp"], vocab_parallel=vocab_parallel, sequence_parallel=sequence_parallel)
        self.model, self.comm, self.mesh = model, comm, mesh
        self.tp, self.dp = mesh["tp"].size(), mesh["dp"].size()
        self.dp_group, self.tp_group = mesh["dp"].get_group(), mesh["tp"].get_group()
        self.vocab_parallel, self.sequence_parallel = vocab_parallel, sequence_parallel
        self.fsdp = None
        if mode == "full" and self.dp > 1:
            self.fsdp = FsdpPlan(model, make_optimizer, comm, bf16, mesh=mesh["dp"])
            self.optimizer = self.fsdp.optimizer
        else:
            self.optimizer = make_optimizer(model)
            if mode == "optimizer" and self.dp > 1:
                self._shard_optimizer(self.optimizer, bucket_mb)
        self.mode = "full" if self.fsdp else "optimizer" if self._zero_pending else "none"
        self.params = [p for p in model.parameters() if p.requires_grad]  # (under FSDP2: its own, sharded over dp)
        self.comm_wait_s = 0.0

    def loss_context(self):
        if not self.vocab_parallel:
            return contextlib.nullcontext()
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
        reduce-scattered them already, and summed the partial ones over tp), or this rank's rows of
        it (ZeRO-1); under sequence parallelism the norms' partial gradients summed over the tp ranks first."""
        if self.fsdp is not None:
            return
        import time

        t0 = time.perf_counter()
        self._grads_like_params()
        if self.zero is not None:
            self.zero.finish()
        elif self.dp > 1:
            average_gradients([p.grad for p in self.params if p.grad is not None], self.dp_group, self.dp)
        self.comm_wait_s += time.perf_counter() - t0

    def clip_grad_norm(self, max_norm: float) -> None:
        """The norm of the whole model's gradient from every rank's parts: each part's squares
        divided by the number of ranks holding the same part, summed over the world (one allreduce)."""
        if self.zero is not None:
            self.zero.clip_grad_norm(max_norm)
            return
        world = self.comm.size
        grads = [p.grad for p in self.params if p.grad is not None]
        clip_parts(grads, [(g, world) for g in grads], max_norm, self.comm.device)
