"""A rank's parts of tensors: what every plan, ZeRO-1 and the pipeline need to read, size, average and
clip tensors that may be DTensors (a tensor-parallel or FSDP2 parameter holds a part of its value on
each rank). A leaf: it imports nothing of hpcllm.parallel.
"""

from __future__ import annotations

import resource

import torch
import torch.distributed as dist


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's part on this rank (sharing its storage), a plain tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def tensor_bytes(t: torch.Tensor) -> int:
    local = local_tensor(t)
    return local.numel() * local.element_size()


def as_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of the whole value (a loss computed on tensor-parallel parts is a DTensor)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by name, a tied one once (under its first name), as detached aliases: loading into
    them loads into the model."""
    return {name: p.detach() for name, p in model.named_parameters()}


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA peak allocated on a GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def replicas(t: torch.Tensor, world: int) -> int:
    """How many ranks hold each element of `t`: the world over the number of its distinct parts."""
    if not hasattr(t, "placements"):
        return world
    parts = 1
    for dim, placement in enumerate(t.placements):  # Shard, or FSDP2's _StridedShard over a tp-split dim
        if not placement.is_replicate():  # (a gradient is never Partial here: finish() has summed it)
            parts *= t.device_mesh.size(dim)
    return world // parts


def allreduce_flat(tensors: list[torch.Tensor], group, divide_by: int) -> None:
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
    allreduce_flat([local_tensor(g) for g in grads], group, size)


def clip_parts(grads: list[torch.Tensor], counted: list[tuple[torch.Tensor, int]], max_norm: float, device) -> None:
    """Scale `grads` (plain tensors or DTensor parts) so that the whole model's gradient norm is at
    most `max_norm`. `counted`: the (gradient, ranks that hold copies of it) whose squares make up the
    norm — each element once over the world, summed in one allreduce."""
    sq = torch.zeros((), device=device, dtype=torch.float32)
    for g, ranks in counted:
        sq += local_tensor(g).float().pow(2).sum() / replicas(g, ranks)
    dist.all_reduce(sq)
    coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for g in grads:
        local_tensor(g).mul_(coef.to(local_tensor(g).dtype))
