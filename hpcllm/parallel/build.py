"""The plan of a layout: after hpcllm.parallel.parallelize has transformed the model (and
hpcllm.parallel.materialize given a meta-built one its parts), the optimizer over what this rank
holds and the gradient reduction the shard mode chooses, in one of the plans' classes.

    p = parallelize(model, layout, comm, bf16=..., activation_checkpointing=...)
    materialize(p.model, device, whole=p.whole, seed=...)      # a model built on the meta device
    plan = build_plan(p, layout, comm, make_optimizer=..., bucket_mb=...)

This is the top of hpcllm.parallel: it imports the plans; nothing in the package imports it.
"""

from __future__ import annotations

from hpcllm.comm import Communicator
from hpcllm.parallel.layout import Layout
from hpcllm.parallel.parallelize import Parallelized
from hpcllm.parallel.pipeline import PipelinePlan
from hpcllm.parallel.plans import FsdpPlan, Plan, Zero1Plan
from hpcllm.parallel.tensor import TensorParallelPlan


def build_plan(p: Parallelized, layout: Layout, comm: Communicator, *, make_optimizer, bucket_mb: float) -> Plan:
    """The plan of `layout` for the parallelized model `p`; `make_optimizer(module)` gives AdamW over
    a module's parameters (the plan shards it under ZeRO-1). With one data-parallel rank every shard
    mode holds everything along dp: `none`."""
    optimizer = make_optimizer(p.model)
    if layout.pp_enabled:
        return PipelinePlan(p.model, optimizer, comm, p.mesh, schedule=layout.pp_schedule, mode=layout.shard,
                            bucket_mb=bucket_mb, vocab_parallel=layout.vocab_parallel,
                            sequence_parallel=layout.sequence_parallel)
    if layout.tp_enabled:
        return TensorParallelPlan(p.model, optimizer, comm, p.mesh, mode=layout.shard, bucket_mb=bucket_mb,
                                  vocab_parallel=layout.vocab_parallel, sequence_parallel=layout.sequence_parallel)
    if layout.zero1_enabled:
        return Zero1Plan(p.model, optimizer, comm, bucket_mb)
    if layout.fsdp_enabled:
        return FsdpPlan(p.model, optimizer, comm)
    return Plan(p.model, optimizer, comm, bucket_mb)
