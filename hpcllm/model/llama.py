"""The `llama` family: the decoder most open models use — Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3.

Pre-RMSNorm blocks, rotary position embeddings (RoPE; `linear` and `llama3` frequency scaling),
grouped-query attention (n_kv_head key/value heads shared by n_head / n_kv_head query heads each),
a SwiGLU MLP, optional q/k/v biases (Qwen2) and per-head q/k RMSNorm (Qwen3), tied or untied output
head, head_dim independent of the hidden size. Parameter names are HF's (`model.layers.N.self_attn.
q_proj.weight`, ...), so weights convert by name. Numerics follow transformers' implementation
(RMSNorm and the rotary tables in fp32), which the tests use as the oracle.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpcllm.model.attention import causal_attention
from hpcllm.model.paged import PagedKVCache
from hpcllm.model.base import CausalLM, Family
from hpcllm.model.config import ModelConfig
from hpcllm.model.llama_config import EMBEDDING_MODULES, HEAD_MODULES, config_from_hf, config_to_hf


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotary frequencies (head_dim / 2,), fp32, with the config's scaling applied."""
    D = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64, device="cpu").float() / D))
    s = cfg.rope_scaling or {}
    kind = s.get("type", s.get("rope_type", "default"))
    if kind == "linear":
        return inv / s["factor"]
    if kind == "llama3":  # Llama 3.1+: long wavelengths slowed by `factor`, short ones kept, smooth between
        factor, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled)
    return inv


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, layer: int = 0, cache: PagedKVCache | None = None, mask=None):
        # heads are -1: under tensor parallelism a rank holds n_head / tp of them (and of the kv heads)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = causal_attention(q, k, v, layer=layer, cache=cache, mask=mask,
                             dropout=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, layer=0, cache=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(CausalLM):
    residual_projections = ("o_proj.weight", "down_proj.weight")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.ffn_dim is None or cfg.vocab_size is None:
            cfg = cfg.resolve(cfg.vocab_size)
        self.config = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.model.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layer))
        self.model.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.tie_weights()
        # a plain attribute, not a buffer: it stays fp32 when the model is cast to bf16, and a model
        # built on the meta device needs nothing restored
        self._inv_freq: torch.Tensor | None = None

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def blocks(self):
        return self.model.layers

    def lookup_only_parameters(self):
        return [] if self.config.tie_embeddings else [self.model.embed_tokens.weight]

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin (B, 1, T, head_dim) for per-row positions (B, T), computed in fp32."""
        if self._inv_freq is None or self._inv_freq.device != positions.device:
            self._inv_freq = rope_inv_freq(self.config).to(positions.device)
        with torch.autocast(positions.device.type, enabled=False):
            freqs = positions[..., None].float() * self._inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    embedding_modules = EMBEDDING_MODULES
    head_modules = HEAD_MODULES

    def embed(self, idx, positions):
        return self.model.embed_tokens(idx)

    def block_inputs(self, x, positions):
        return self.rotary(positions.expand(x.shape[0], -1), x.dtype)  # as HF: in the embeddings' dtype

    def head(self, x):
        return self.lm_head(self.model.norm(x))


# ------------------------------------------------------------------------------------- HF mapping
# (config.json: llama_config.py, without torch)

def name_from_hf(name: str) -> str | None:
    return None if name.endswith("rotary_emb.inv_freq") else name  # old exports saved the rotary table


FAMILY = Family(name="llama", model=Llama, config_from_hf=config_from_hf, config_to_hf=config_to_hf,
                name_from_hf=name_from_hf, name_to_hf=lambda name: name)
