"""What every family's attention shares: the KV cache, the left-padded batch layout the inference
engine uses, and causal attention that writes the cache.

Inference passes a preallocated `KVCache` and, for batches of prompts with different lengths, rows
LEFT-padded to a common length so every row writes the same cache slot at each step, with per-row
`positions` (slot minus the row's padding) and a key mask that hides the padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hpcllm.model.paged import PagedKVCache


class KVCache:
    """Keys and values of every layer for `batch` rows and up to `max_len` positions, allocated once.
    Sized by the key/value heads: with grouped-query attention that is n_head / n_kv_head times
    smaller than a cache of the query heads."""

    def __init__(self, n_layer: int, n_kv_head: int, head_dim: int, batch: int, max_len: int, device,
                 dtype=torch.float32):
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.batch, self.max_len = batch, max_len


def causal_attention(q, k, v, *, layer: int = 0, cache: KVCache | None = None, start=0, mask=None,
                     dropout: float = 0.0):
    """q (B, H, T, D), k/v (B, Hkv, T, D) -> (B, H, T, D).

    With `cache`, k/v are written to cache slots start..start+T-1 and attention covers slots
    0..start+T-1 (`mask`, if given, is (B, 1, T, start+T), True = attend). A `PagedKVCache` (the
    inference engine's) says itself where they go and what each row attends to."""
    if isinstance(cache, PagedKVCache):
        return cache.attend(layer, q, k, v, mask)
    B, _, T, _ = q.shape
    if cache is not None:
        cache.k[layer, :B, :, start : start + T] = k
        cache.v[layer, :B, :, start : start + T] = v
        k = cache.k[layer, :B, :, : start + T]
        v = cache.v[layer, :B, :, : start + T]
    gqa = k.shape[1] != q.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa)


def positions_and_mask(idx: torch.Tensor, cache, start, positions, mask, context: int):
    """The positions (B, T) and mask a forward pass uses when the caller gave none: unpadded rows
    starting at slot `start`, causal over the cache when there is one."""
    B, T = idx.shape
    if positions is None:
        if start + T > context:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context ({context})")
        positions = torch.arange(start, start + T, device=idx.device).unsqueeze(0)
    if mask is None and cache is not None and (start > 0 or T > 1):
        q = torch.arange(start, start + T, device=idx.device)
        mask = (torch.arange(start + T, device=idx.device)[None, :] <= q[:, None])[None, None]
    return positions, mask


@dataclass
class PaddedBatch:
    """Left-padded prompts: `tokens` (B, L), `pad` (B,) padding per row."""

    tokens: torch.Tensor
    pad: torch.Tensor

    @staticmethod
    def build(prompts: list[list[int]], pad_id: int, device) -> "PaddedBatch":
        L = max(len(p) for p in prompts)
        tokens = torch.full((len(prompts), L), pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, L - len(p) :] = torch.tensor(p, dtype=torch.long)
        pad = torch.tensor([L - len(p) for p in prompts], dtype=torch.long)
        return PaddedBatch(tokens.to(device), pad.to(device))


def padded_positions_and_mask(pad: torch.Tensor, start: int, T: int):
    """Positions (B, T) and attention mask (B, 1, T, start+T) for left-padded rows whose queries sit at
    cache slots start..start+T-1. A padding query attends to itself only, so no row is all-masked."""
    q = torch.arange(start, start + T, device=pad.device)
    k = torch.arange(start + T, device=pad.device)
    positions = (q[None, :] - pad[:, None]).clamp(min=0)
    mask = (k[None, None, :] <= q[None, :, None]) & (k[None, None, :] >= pad[:, None, None])
    mask = mask | (k[None, None, :] == q[None, :, None])
    return positions, mask[:, None]
