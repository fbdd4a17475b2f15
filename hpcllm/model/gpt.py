"""GPT-2: learned positions, pre-LayerNorm blocks, GELU MLP, tied embeddings, causal attention
through `F.scaled_dot_product_attention`. Parameter names follow HF's GPT2LMHeadModel so that
weights convert by name (hf.py).

Training calls `model(idx, targets)`. Inference passes a preallocated `KVCache` and, for batches of
prompts with different lengths, the layout the engine uses: rows LEFT-padded to a common length so
every row writes the same cache slot at each step, with per-row `positions` (slot minus the row's
padding) and a key mask that hides the padding.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpcllm.model.config import ModelConfig


class KVCache:
    """Keys and values of every layer for `batch` rows and up to `max_len` positions, allocated once."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype=torch.float32):
        shape = (cfg.n_layer, batch, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.batch, self.max_len = batch, max_len


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_embd = cfg.n_head, cfg.n_embd
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x, layer: int = 0, cache: KVCache | None = None, start=0, mask=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None and isinstance(start, torch.Tensor):
            # slot indices as a tensor and attention over the whole cache: no Python-side shapes
            # change from step to step, so a CUDA graph can capture the decode step
            cache.k[layer, :B].index_copy_(2, start, k)
            cache.v[layer, :B].index_copy_(2, start, v)
            k, v = cache.k[layer, :B], cache.v[layer, :B]
        elif cache is not None:
            cache.k[layer, :B, :, start : start + T] = k
            cache.v[layer, :B, :, start : start + T] = v
            k = cache.k[layer, :B, :, : start + T]
            v = cache.v[layer, :B, :, : start + T]
        drop = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        # HF GPT-2's "gelu_new" is the tanh approximation
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, layer=0, cache=None, start=0, mask=None):
        x = x + self.drop(self.attn(self.ln_1(x), layer, cache, start, mask))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.n_layer is None or cfg.vocab_size is None:
            cfg = cfg.resolve(cfg.vocab_size)
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied embeddings

    def init_weights(self, seed: int | None = None) -> "GPT":
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    p.copy_(torch.randn(p.shape, generator=gen) * (0.02 / math.sqrt(2 * self.config.n_layer)))
                elif p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
                elif name.endswith("bias"):
                    p.zero_()
                else:  # LayerNorm weights
                    p.fill_(1.0)
        return self

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def estimate_flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N plus attention (PaLM appendix B)."""
        c = self.config
        T = seq_len or c.block_size
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * T

    def forward(self, idx, targets=None, *, cache: KVCache | None = None, start: int = 0, positions=None, mask=None):
        """idx (B, T) -> logits (B, T, vocab), loss (mean cross-entropy over targets != -1, or None).

        With `cache`, keys/values go to cache slots start..start+T-1 and attention covers slots
        0..start+T-1; `positions` (B, T) and a boolean `mask` (B, 1, T, start+T; True = attend) then
        describe the left-padded rows. Without them, rows are unpadded and causal. `start` may also
        be a tensor of the T slot indices: attention then spans the whole cache and `mask` must be
        (B, 1, T, cache.max_len) — the fixed-shape form CUDA graphs need."""
        B, T = idx.shape
        if positions is None:
            if start + T > self.config.block_size:
                raise ValueError(f"sequence of {start + T} tokens exceeds the context ({self.config.block_size})")
            positions = torch.arange(start, start + T, device=idx.device).unsqueeze(0)
        if mask is None and cache is not None and (start > 0 or T > 1):
            # unpadded rows with a cache: causal over slots 0..start+T-1
            q = torch.arange(start, start + T, device=idx.device)
            mask = (torch.arange(start + T, device=idx.device)[None, :] <= q[:, None])[None, None]
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for i, block in enumerate(self.transformer.h):
            x = block(x, i, cache, start, mask)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizer(self, weight_decay: float, lr: float, betas=(0.9, 0.95), fused: bool | None = None):
        """AdamW; weight decay on matrices only (not biases, LayerNorms); fused kernel on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        if fused is None:
            fused = next(self.parameters()).is_cuda and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=bool(fused))


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
