"""Parallel plans: how a model's state is spread over the ranks (`parallel.shard`).

    none       data parallel: every rank holds everything (hpcllm.train.grad_sync)
    optimizer  ZeRO-1: optimizer state and step sharded (hpcllm.parallel.zero), on every backend
    full       ZeRO-3 with PyTorch's FSDP2, on the torch backend

`build_plan` (hpcllm.parallel.plans) gives the trainer one interface for all three.
"""
