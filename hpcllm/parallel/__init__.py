"""Parallel plans: how a model's state is spread over the ranks.

    shard none       data parallel: every rank holds everything (hpcllm.train.grad_sync)
    shard optimizer  ZeRO-1: optimizer state and step sharded (hpcllm.parallel.zero), on every backend
    shard full       ZeRO-3 with PyTorch's FSDP2, on the torch backend
    tp N             tensor parallel: each layer split over N adjacent ranks (hpcllm.parallel.tensor)
    pp N             pipeline parallel: the layers split into N stages, or N x V interleaved (V per rank)
                     (hpcllm.parallel.pipeline, hpcllm.parallel.stages)

`build_plan` (hpcllm.parallel.plans) gives the trainer one interface for all of them.
"""
