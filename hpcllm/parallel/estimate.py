"""What a rank holds under a parallel plan, computed from the model's parameter names and shapes
alone — worked out from the config without torch (hpcllm.model.shapes.parameter_shapes), or read off
a built model (the trainer's, on the meta device) — so that a plan for a world you don't have (64
GPUs) is checked on a login node, and printed beside the measured figures at the end of a run.

    parameters   fp32; with pp > 1 only those of the rank's pipeline stages (hpcllm.parallel.stages:
                 their layers, the embedding on the first stage, the head on the last, a tied weight on
                 both; one stage per rank, or pp_virtual_stages of them); split over tp for the layers
                 the family's tp plan names (hpcllm.parallel.families); over dp too with parallel.shard full
    gradients    as the parameters (ZeRO-1 keeps whole gradients: it reduce-scatters them)
    optimizer    AdamW's two fp32 moments per parameter (and a step counter each); over dp with
                 parallel.shard optimizer or full

Activations are not included: they depend on batch x seq_len x n_layer (train.activation_
checkpointing keeps one block's) and are what the rest of the device is for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hpcllm.model.shapes import ModelShapes, model_shapes
from hpcllm.parallel.families import tp_split_dim
from hpcllm.parallel.layout import rank_stages, stage_layers


@dataclass
class Holding:
    name: str
    shape: tuple[int, ...]
    tp_dim: int | None  # the dimension split over the tensor-parallel ranks, None: whole on each

    def rank0_elements(self, tp: int, dp: int) -> int:
        """Elements of rank 0's part (the largest: parts are rounded up) — split over tp along tp_dim,
        then over dp along dim 0 (FSDP2 and ZeRO-1 both cut rows)."""
        shape = list(self.shape)
        if self.tp_dim is not None:
            shape[self.tp_dim] = -(-shape[self.tp_dim] // tp)
        shape[0] = -(-shape[0] // dp)
        return math.prod(shape)


def shapes_of(model) -> ModelShapes:
    """A model's parameter shapes: `model` is a ModelShapes already, or a built CausalLM."""
    return model if isinstance(model, ModelShapes) else model_shapes(model)


def holdings(model) -> list[Holding]:
    """Each parameter of `model` (a ModelShapes or a built model; a tied one once) and which
    dimension tensor parallelism splits (the family's table, hpcllm.parallel.families)."""
    shapes = shapes_of(model)
    arch = shapes.config.arch
    return [Holding(name, shape, tp_split_dim(arch, shapes.blocks, name)) for name, shape in shapes.params]


def stage_parameter_names(model, stages: list[int], n_stages: int) -> list[str]:
    """The names of the parameters `stages` (of `n_stages`) hold together, a tied weight under its first
    name: those of their blocks, of the embedding modules on the first stage, of the head modules on the
    last — what hpcllm.parallel.stages keeps of the model for them, worked out from the names."""
    shapes = shapes_of(model)
    layers = stage_layers(shapes.config.n_layer, n_stages)
    prefixes = []
    for s in stages:
        prefixes += [f"{shapes.blocks}.{i}." for i in layers[s]]
        prefixes += [f"{m}." for m in shapes.embedding_modules] if s == 0 else []
        prefixes += [f"{m}." for m in shapes.head_modules] if s == n_stages - 1 else []
    prefixes = tuple(prefixes)
    return [name for name, _ in shapes.params if any(n.startswith(prefixes) for n in shapes.names_of(name))]


def estimate_memory(model, shard: str, tp: int, dp: int, pp: int = 1, pp_rank: int = 0,
                    virtual_stages: int = 1) -> dict[str, int]:
    """Bytes per rank: params_bytes, grads_bytes, optimizer_bytes — of rank 0 (the largest part of
    each tensor), or of a rank at pipeline coordinate `pp_rank` (its `virtual_stages` stages).
    `model`: a ModelShapes (`hpcllm plan`) or the whole built model (the trainer)."""
    shapes = shapes_of(model)
    held = holdings(shapes)
    if pp > 1:
        names = set(stage_parameter_names(shapes, rank_stages(pp_rank, pp, virtual_stages), pp * virtual_stages))
        held = [h for h in held if h.name in names]
    per_tp = sum(h.rank0_elements(tp, 1) for h in held)
    over_dp = sum(h.rank0_elements(tp, dp) for h in held)
    params = over_dp if shard == "full" else per_tp
    grads = over_dp if shard == "full" else per_tp  # ZeRO-1 reduce-scatters whole gradients
    moments = 2 * (per_tp if shard == "none" else over_dp)
    return {"params_bytes": 4 * params, "grads_bytes": 4 * grads, "optimizer_bytes": 4 * moments + 4 * len(held)}


def pipeline_bubble(pp: int, micro_batches: int, virtual_stages: int = 1) -> float:
    """The idle fraction of each step on every pipeline rank, forward and backward of a stage taking
    1/V of the rank's time: (pp-1) / (V m + pp-1) for m >= pp micro-batches — GPipe's and 1F1B's
    (pp-1) / (m + pp-1) at V = 1. With fewer micro-batches than ranks, PyTorch's interleaved order
    waits for each micro-batch to come round the ranks between a rank's chunks: then
    1 - V m / (V pp + m - 1). ScheduleLoopedBFS's orders give the same. (Both from PyTorch's orders,
    simulated step by step: tests/train/test_pipeline_bubble.py, any ratio of backward to forward time.)"""
    m, v = micro_batches, virtual_stages
    return 1 - v * m / (v * max(m, pp) + min(m, pp) - 1)
