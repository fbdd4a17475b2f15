"""What a rank holds under a parallel plan, computed from the model's shapes alone (a model on the
meta device: nothing allocated), so that a plan for a world you don't have (64 GPUs) is checked
on a login node — and printed beside the measured figures at the end of a run.

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

import torch


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


def holdings(model) -> list[Holding]:
    """Each parameter of `model` (a tied one once) and which dimension tensor parallelism splits."""
    from hpcllm.parallel.families import tp_plan

    try:
        plan = tp_plan(model, True)
    except NotImplementedError:
        plan = {}
    out = []
    for name, p in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        style = type(plan.get(module)).__name__
        if style == "ColwiseParallel":  # output features: the rows of the weight, and the bias
            dim = 0
        elif style == "RowwiseParallel":  # input features: an nn.Linear's columns, an nn.Embedding's rows;
            # a row layer's bias is added after the sum over the tp ranks: whole on every rank
            embedding = isinstance(model.get_submodule(module), torch.nn.Embedding)
            dim = None if name.endswith("bias") else (0 if embedding else 1)
        else:
            dim = None
        out.append(Holding(name, tuple(p.shape), dim))
    return out


def estimate_memory(model, shard: str, tp: int, dp: int, pp: int = 1, pp_rank: int = 0,
                    virtual_stages: int = 1) -> dict[str, int]:
    """Bytes per rank: params_bytes, grads_bytes, optimizer_bytes — of rank 0 (the largest part of
    each tensor), or of a rank at pipeline coordinate `pp_rank` (its `virtual_stages` stages)."""
    held = holdings(model)
    if pp > 1:
        from hpcllm.parallel.stages import rank_stages, stage_parameter_names

        names = set(stage_parameter_names(model, rank_stages(pp_rank, pp, virtual_stages), pp * virtual_stages))
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
