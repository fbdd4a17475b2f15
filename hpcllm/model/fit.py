"""Will the model fit? Checked from its sizes alone, before anything is allocated: a config.json or a
spec that asks for more memory than the rank has is refused in one line naming the sizes, instead of
ending in the allocator's traceback (or in a node that swaps itself to death)."""

from __future__ import annotations

import os

from hpcllm.errors import ConfigError, DataError
from hpcllm.model.registry import param_count


def device_memory(device, ranks_on_node: int = 1) -> int:
    """Bytes one rank may use: its GPU's memory, or the node's memory shared by its ranks."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, ranks_on_node)


def check_fits(cfg, *, bytes_per_param: float, device, ranks_on_node: int = 1, source: str,
               what: str = "weights") -> None:
    """Refuse a model whose `bytes_per_param` (per rank, the plan's sharing already divided in) times
    its parameters is more than the rank's memory. `source` names where the sizes came from (a
    config.json: DataError, exit 5; the spec's model section: ConfigError, exit 2)."""
    n = param_count(cfg)
    if n is None:
        return
    need, have = n * bytes_per_param, device_memory(device, ranks_on_node)
    if need <= have:
        return
    error = DataError if source.endswith(".json") else ConfigError
    raise error(f"{source}: n_layer={cfg.n_layer}, n_embd={cfg.n_embd}, ffn_dim={cfg.ffn_dim}, vocab_size="
                f"{cfg.vocab_size} make {n / 1e9:.2f}B parameters, whose {what} need {_gib(need)} per rank, more "
                f"than the {_gib(have)} this rank has ({device}{f', {ranks_on_node} ranks per node' if ranks_on_node > 1 else ''}): "
                "check the sizes, or split the model (parallel.shard full, tp, pp; `hpcllm plan SPEC "
                "--memory-per-rank` shows what fits)")


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"
