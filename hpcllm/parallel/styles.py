"""Tensor parallelism's styles (`parallel.tp`), in PyTorch's DTensor terms: what a family's plan
(hpcllm.parallel.families) is written in, and what `parallelize_module` applies on the mesh's `tp`
dimension (hpcllm.parallel.parallelize).

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

from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleOutput, RowwiseParallel,
                                               SequenceParallel)
from torch.distributed.tensor.parallel.style import ParallelStyle


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

