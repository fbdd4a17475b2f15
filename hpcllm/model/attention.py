"""What every family's attention shares: causal attention over a whole sequence (training), or over
the rows of the inference engine's paged KV cache (hpcllm.model.paged), which writes each row's new
keys and values and says, through the engine's mask and positions, what each row attends to."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hpcllm.model.paged import PagedKVCache


def causal_attention(q, k, v, *, layer: int = 0, cache: PagedKVCache | None = None, mask=None,
                     dropout: float = 0.0):
    """q (B, H, T, D), k/v (B, Hkv, T, D) -> (B, H, T, D): causal over the T positions, or — with the
    inference engine's `cache` (hpcllm.model.paged) — over what each row holds, as `mask` says."""
    if cache is not None:
        return cache.attend(layer, q, k, v, mask)
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, enable_gqa=gqa)


def default_positions(idx: torch.Tensor, context: int) -> torch.Tensor:
    """Positions 0..T-1 of unpadded rows (training, a whole-sequence forward), within the context."""
    T = idx.shape[1]
    if T > context:
        raise ValueError(f"sequence of {T} tokens exceeds the context ({context})")
    return torch.arange(T, device=idx.device).unsqueeze(0)
