"""The model transforms of a parallel layout, applied by one function in one order — torchtitan's
`parallelize_llama`:

    1. tensor parallel    each layer split over the mesh's `tp` ranks by its family's plan
                          (hpcllm.parallel.families), on the whole model
    2. pipeline cut       the model cut to this rank's stages (hpcllm.parallel.stages)
    3. activation ckpt    each block's activations recomputed in backward (train.activation_checkpointing)
    4. FSDP2              `fully_shard` per block, then the root, over the mesh's `dp` ranks
                          (parallel.shard full; each pipeline stage its own root)

The model arrives whole on every rank, or on the meta device (the layout splits the parameters
themselves: hpcllm.parallel.materialize gives each rank its part after). What comes out is what
the plan (hpcllm.parallel.build) makes the optimizer and the gradient reduction for.

Adding a model family: its tensor-parallel plan in hpcllm.parallel.families; the pipeline asks the
model for its pieces (`embed`, `block_inputs`, `head`, `embedding_modules`, `head_modules`) and FSDP2
for its `blocks()`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from hpcllm.parallel.families import tp_plan
from hpcllm.parallel.layout import Layout, device_mesh


@dataclass
class Parallelized:
    """A model after the layout's transforms: what this rank runs and the mesh they used."""

    model: torch.nn.Module  # the (split, sharded) model, or this rank's StageModule under a pipeline
    mesh: object | None  # the DeviceMesh: None where the layout has one dimension and no FSDP2
    # a meta copy of the whole model taken before the pipeline cut: materialize draws (or reads) every
    # parameter of it in its order, and the stage keeps those it holds
    whole: torch.nn.Module | None = None


def parallelize(model, layout: Layout, comm, *, bf16: bool, activation_checkpointing: bool = False) -> Parallelized:
    """Apply `layout` to `model` (a CausalLM): tensor parallel, pipeline cut, activation
    checkpointing, FSDP2 — in that order, each where the layout asks for it."""
    needs_mesh = layout.tp_enabled or layout.pp_enabled or layout.fsdp_enabled
    mesh = layout.build_mesh(comm) if needs_mesh else None
    whole = copy.deepcopy(model) if layout.pp_enabled else None  # (on the meta device: costs nothing)
    if layout.tp_enabled:
        split_model(model, mesh["tp"], vocab_parallel=layout.vocab_parallel, sequence_parallel=layout.sp_enabled)
    part = model
    if layout.pp_enabled:
        from hpcllm.parallel.layout import rank_stages
        from hpcllm.parallel.stages import StageModule

        pp_rank = layout.coordinates(comm.rank)[0]
        part = StageModule(model, rank_stages(pp_rank, layout.pp, layout.virtual_stages),
                           layout.pp * layout.virtual_stages, sequence_split=layout.tp if layout.sp_enabled else 1)
    model.activation_checkpointing = activation_checkpointing  # (run_block asks it: the model's own flag)
    if layout.fsdp_enabled:
        dp_mesh = mesh["dp"] if mesh.mesh_dim_names else mesh
        for unit in (part.chunks if layout.pp_enabled else [part]):
            fully_shard_blocks(unit, dp_mesh, bf16)
    return Parallelized(part, mesh, whole)


def split_model(model, tp_mesh, *, vocab_parallel: bool, sequence_parallel: bool = False):
    """`model` split over `tp_mesh` in place by its family's plan: the same whole model on every rank
    (inference), or one on the meta device that hpcllm.parallel.materialize fills after (training)."""
    from torch.distributed.tensor.parallel import parallelize_module

    parallelize_module(model, tp_mesh, tp_plan(model, vocab_parallel, sequence_parallel))
    model.tie_weights()  # the embedding and the head are both split by vocabulary rows: one DTensor
    model.tp_size = tp_mesh.size()
    return model


def fully_shard_blocks(model, mesh, bf16: bool) -> None:
    """FSDP2 over `mesh`: each of `model.blocks()` its own unit, then `model` (what is left: the
    embedding, the final norm and the head) — fp32 reduction; bf16 parameters under train.dtype bf16."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for block in model.blocks():
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def for_inference(model, comm, tp: int):
    """(model, the tp group): the model split over groups of `tp` adjacent ranks for the inference
    engine — logits gathered on every rank of a group (each makes the same sampling decision from
    the same logits and the same per-record generator), the KV cache split by kv heads — and the
    torch.distributed group of this rank's tp ranks (the shard queue tells a group its shard)."""
    tp_mesh = device_mesh(comm, tp, named=True)["tp"]  # named at tp=1 too: a group of one rank
    return split_model(model, tp_mesh, vocab_parallel=False), tp_mesh.get_group()
