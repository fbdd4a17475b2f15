"""Parallel plans: how a model's state is spread over the ranks.

    shard none       data parallel: every rank holds everything (hpcllm.parallel.grad_sync)
    shard optimizer  ZeRO-1: optimizer state and step sharded (hpcllm.parallel.zero), on every backend
    shard full       ZeRO-3 with PyTorch's FSDP2, on the torch backend
    tp N             tensor parallel: each layer split over N adjacent ranks (hpcllm.parallel.tensor)
    pp N             pipeline parallel: the layers split into N stages, or N x V interleaved (V per rank)
                     (hpcllm.parallel.pipeline, hpcllm.parallel.stages)

The path of a training run through the package:

    layout = spec.parallel.layout(world)                  # layout.py: the dimensions, checks, mesh
    p = parallelize(model, layout, comm, ...)             # parallelize.py: tp split, pipeline cut,
                                                          #   activation checkpointing, FSDP2
    materialize(model, device, whole=p.whole, ...)        # materialize.py: a meta-built model's parts
    plan = build_plan(p, layout, comm, ...)               # build.py: optimizer + gradient reduction

Layers, lowest first (none imports one after it):

    errors, fields, paths, atomic, log      leaves
    comm  <  model  <  parallel  <  train  <  infer  <  jobs  <  launch  <  cli (and bench)

(the spec, hpcllm.config, and checkpoint, monitor and report sit beside train and are not checked
yet). This package imports comm, model and errors only; train, infer and bench import it. The model layer
knows nothing of parallelism: each family's tensor-parallel plan lives here (families.py). Each
package's `cli.py` registers its commands and belongs to the cli layer. Within this package, lowest
first — a module imports only those before it:

    layout, parts, grad_sync, styles              leaves (layout imports no torch: config-time checks,
                                                  the stage arithmetic)
    stages, config (the spec section), families, zero, estimate, materialize
                                                  (families and estimate import no torch: `hpcllm plan`)
    plans (the base plan, 1-D plans)  <  tensor  <  pipeline
    parallelize  <  build                         the top: nothing in the package imports it

tests/test_imports.py checks that hpcllm/ has no import circle and that none of these layers
imports one above it (scripts/import_cycles.py prints the graph's circles).
"""
