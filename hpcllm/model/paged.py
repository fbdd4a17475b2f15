"""A paged KV cache: keys and values in fixed-size blocks from one pool, each row a list of blocks.

Memory follows what the rows hold (a row of 40 tokens takes 3 blocks of 16, whatever the longest row
or the context), and a block can belong to several rows at once: rows whose prompts begin with the
same tokens (a chat template's system prompt, a few-shot preamble, one document scored many ways)
read the same blocks, computed once. Which block belongs to which row, and which prompt prefixes
the pool already holds, is the inference engine's business (hpcllm.infer.blocks); this module is
what the model's attention sees of it.

Before each forward the engine says, for the batch's B rows of T new tokens each:
- `tables` (B, n): the blocks of each row in order (the row's tokens 0..BS-1 are in tables[b, 0]...);
  a short row is filled up with the scratch block, which its mask hides;
- `write_block`, `write_offset` (B, T): where each new token's keys and values go; padding tokens of
  a prefill batch go to the scratch block;
and passes `mask` (B, 1, T, n * BS) and the tokens' `positions` to the model. Attention writes the new
keys and values, gathers each row's blocks into one (B, Hkv, n * BS, D) tensor and runs SDPA on it
(the gather is a copy: what this costs against a static cache is in docs/performance.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCRATCH = 0  # block 0 is never handed out: padding tokens write there, short tables point there


class PagedKVCache:
    def __init__(self, n_layer: int, n_kv_head: int, head_dim: int, n_blocks: int, block_size: int, device,
                 dtype=torch.float32):
        # (layer, block, slot in block, kv head, dim): a row's blocks gathered and viewed as
        # (row, block * slot, head, dim) are its keys in order with no further copy. Zeros, not
        # empty: masked keys still enter SDPA's product, and garbage could be NaN (0 * NaN = NaN).
        shape = (n_layer, n_blocks, block_size, n_kv_head, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.block_size = block_size
        self.tables: torch.Tensor | None = None
        self.write_block: torch.Tensor | None = None
        self.write_offset: torch.Tensor | None = None

    @property
    def n_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def bytes_per_block(self) -> int:
        return 2 * self.k[:, 0].numel() * self.k.element_size()

    def grow(self, n_blocks: int) -> None:
        """More blocks, the held ones kept where they are (block ids stay valid)."""
        old = self.n_blocks
        if n_blocks <= old:
            return
        shape = (self.k.shape[0], n_blocks) + tuple(self.k.shape[2:])
        for name in ("k", "v"):
            new = torch.zeros(shape, device=self.k.device, dtype=self.k.dtype)
            new[:, :old] = getattr(self, name)
            setattr(self, name, None)  # free the old pool before the next one is made
            setattr(self, name, new)

    def set_batch(self, tables: torch.Tensor, write_block: torch.Tensor, write_offset: torch.Tensor) -> None:
        self.tables, self.write_block, self.write_offset = tables, write_block, write_offset

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor):
        """q (B, H, T, D), the new k/v (B, Hkv, T, D) -> (B, H, T, D), after writing k/v to the cache."""
        B, Hkv, T, D = k.shape
        blocks, offsets = self.write_block.reshape(-1), self.write_offset.reshape(-1)
        self.k[layer].index_put_((blocks, offsets), k.transpose(1, 2).reshape(B * T, Hkv, D))
        self.v[layer].index_put_((blocks, offsets), v.transpose(1, 2).reshape(B * T, Hkv, D))
        n = self.tables.shape[1]
        keys = self.k[layer][self.tables].view(B, n * self.block_size, Hkv, D).transpose(1, 2)
        values = self.v[layer][self.tables].view(B, n * self.block_size, Hkv, D).transpose(1, 2)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=Hkv != q.shape[1])
