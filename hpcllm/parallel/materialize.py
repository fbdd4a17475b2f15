"""A model larger than one rank's memory: built on the meta device (shapes, no storage), sharded
there by the plan (FSDP2's `fully_shard`, tensor parallelism's `parallelize_module`), and only then
given storage — each rank its own part — and filled:

    fresh     every parameter's whole initial value is drawn in turn, from the same generator in the
              same order as `CausalLM.init_weights` on one rank (`CausalLM.initial_values`, over the
              whole model's layout even on a pipeline stage), and this rank keeps its part of the
              values of the parameters it holds: exactly the slice of the one-rank model
    model.init  each tensor of the HF directory is read in turn and this rank keeps its part
    resume    nothing: the checkpoint is loaded into the parts (DCP) right after

So a rank never holds more of the model than its part plus one whole tensor (the largest parameter,
e.g. the embedding) for the moment it is cut. A pipeline stage (`parallel.pp`) materialises only
the layers it runs. `parallel.shard: none | optimizer` without tp or pp keep the whole model on
every rank by definition and build it whole.

The part of a whole value that a rank holds is what DTensor's own `distribute_tensor` cuts for the
parameter's mesh and placements (`src_data_rank=None`: every rank cuts its part locally, no
communication) — including FSDP2-over-tensor-parallel's `_StridedShard` and the uneven chunks of
`torch.chunk` — so it is by definition the layout `full_tensor()` reassembles.
"""

from __future__ import annotations

import torch

from hpcllm.errors import TrainingError


def builds_on_meta(pc, world: int) -> bool:
    """Whether the layout of ParallelConfig `pc` splits the parameters themselves (Layout.builds_on_meta)."""
    return pc.layout(world).builds_on_meta


def local_part(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """This rank's part of `value`, the whole value of `param` (a DTensor: its part; a plain
    tensor: all of it)."""
    if not hasattr(param, "placements"):
        return value
    from torch.distributed.tensor import distribute_tensor

    part = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None).to_local()
    if part.shape != param.to_local().shape:  # a layout distribute_tensor does not describe: never copy a wrong cut
        raise TrainingError(f"internal: this rank's part of a {tuple(value.shape)} parameter with placements "
                            f"{param.placements} is {tuple(param.to_local().shape)}, but distribute_tensor cuts "
                            f"{tuple(part.shape)}")
    return part


@torch.no_grad()
def copy_whole_value(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy this rank's part of `value` (the whole value of `param`) into `param`."""
    local = param.to_local() if hasattr(param, "to_local") else param
    local.copy_(local_part(param, value))


def materialize(model, device, *, seed: int | None = None, hf_dir: str | None = None, whole=None):
    """Give a meta-device model, already sharded by its plan, storage for this rank's parts on
    `device`, and fill them: from `hf_dir`'s weights, or fresh from `seed`, or (both None) not at
    all, for a checkpoint to be loaded into right after. `whole`: a meta copy of the whole model
    taken before a pipeline plan pruned `model` to its stage — values are drawn (or read) for every
    parameter of it, in its order, and the stage keeps those of the parameters it holds."""
    whole = model if whole is None else whole
    if any(True for _ in model.buffers()):
        # to_empty leaves buffers uninitialised and a meta-built model has no values to restore them
        # from: a family that needs one keeps it as a plain attribute computed on first use (Llama's
        # rotary frequencies) instead
        names = [n for n, _ in model.named_buffers()]
        raise TrainingError(f"internal: {type(model).__name__} has buffers ({', '.join(names[:3])}), which a "
                            "model built on the meta device cannot restore")
    before = list(model.parameters())
    # the plan's optimizer holds these parameter objects: each keeps its identity and gets new storage
    # (swap_tensors; to_empty would otherwise replace a plain parameter moved off meta by a new one)
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    if any(a is not b for a, b in zip(before, model.parameters())):
        raise TrainingError("internal: materialising the model replaced parameter objects the optimizer holds")
    if whole is model:  # (a pipeline stage may lack one side of a tie; swapping kept every tie anyway)
        model.tie_weights()  # (a tied parameter is one object, swapped once per name: already tied; certain now)
    if hf_dir is not None:
        from hpcllm.model.hf import stream_hf_weights

        params = dict(model.named_parameters(remove_duplicate=False))
        stream_hf_weights(hf_dir, whole, lambda name, t: copy_whole_value(params[name], t) if name in params else None)
    elif seed is not None:
        params = dict(model.named_parameters())
        for name, value in whole.initial_values(seed):
            if name in params:  # (a pipeline stage holds some of them)
                copy_whole_value(params[name], value)
            del value  # (the generator draws the next one: never two whole values at once)
    return model


def held_bytes(model) -> tuple[int, int]:
    """(bytes of this rank's parts of the parameters, bytes of the whole model's parameters)."""
    held = whole = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        held += local.numel() * local.element_size()
        whole += p.numel() * p.element_size()
    return held, whole
