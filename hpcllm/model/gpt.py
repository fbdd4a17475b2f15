"""The `gpt2` family: learned positions, pre-LayerNorm blocks, GELU MLP, tied embeddings, causal
attention through `F.scaled_dot_product_attention`. Parameter names follow HF's GPT2LMHeadModel, so
weights convert by name (HF's Conv1D matrices are stored transposed).
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from hpcllm.model.attention import causal_attention
from hpcllm.model.paged import PagedKVCache
from hpcllm.model.base import CausalLM, Family
from hpcllm.model.config import ModelConfig
from hpcllm.model.gpt_config import EMBEDDING_MODULES, HEAD_MODULES, config_from_hf, config_to_hf

ACTIVATIONS = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # HF's gelu_new / gelu_pytorch_tanh
    "gelu": F.gelu,
    "relu": F.relu,
}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_embd = cfg.n_head, cfg.n_embd
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x, layer: int = 0, cache: PagedKVCache | None = None, mask=None):
        # c_attn's rows are head-major (q, k, v of head 0, then of head 1, ...; see qkv_to_head_major),
        # so a tensor-parallel rank's contiguous rows are whole heads: the head count is -1 here
        B, T, C = x.shape
        D = C // self.n_head
        q, k, v = self.c_attn(x).view(B, T, -1, 3, D).unbind(3)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        y = causal_attention(q, k, v, layer=layer, cache=cache, mask=mask,
                             dropout=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.ffn_dim, cfg.n_embd, bias=cfg.bias)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, layer=0, cache=None, mask=None):
        x = x + self.drop(self.attn(self.ln_1(x), layer, cache, mask))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(CausalLM):
    residual_projections = ("c_proj.weight",)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.ffn_dim is None or cfg.vocab_size is None:
            cfg = cfg.resolve(cfg.vocab_size)
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        self.lm_head.weight = self.transformer.wte.weight  # always tied in this family

    def blocks(self):
        return self.transformer.h

    def lookup_only_parameters(self):
        return [self.transformer.wpe.weight]  # wte is also the output matrix (tied)

    embedding_modules = EMBEDDING_MODULES
    head_modules = HEAD_MODULES

    def embed(self, idx, positions):
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))

    def head(self, x):
        return self.lm_head(self.transformer.ln_f(x))


# ------------------------------------------------------------------------------------- HF mapping
# (config.json: gpt_config.py, without torch)

_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in old HF checkpoints


def name_from_hf(name: str) -> str | None:
    if name.endswith(_HF_BUFFERS):
        return None
    return name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"  # some drop the prefix


def qkv_to_head_major(t, n_head: int):
    """HF's c_attn rows (all q, all k, all v) -> ours (q, k, v of each head in turn); a bias too."""
    return t.reshape(3, n_head, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def qkv_from_head_major(t, n_head: int):
    return t.reshape(n_head, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def tensor_from_hf(name: str, t, cfg: ModelConfig):
    t = t.t() if name.endswith(_TRANSPOSED) else t
    return qkv_to_head_major(t, cfg.n_head) if ".attn.c_attn." in name else t


def tensor_to_hf(name: str, t, cfg: ModelConfig):
    t = qkv_from_head_major(t, cfg.n_head) if ".attn.c_attn." in name else t
    return t.t() if name.endswith(_TRANSPOSED) else t


FAMILY = Family(
    name="gpt2", model=GPT, config_from_hf=config_from_hf, config_to_hf=config_to_hf,
    name_from_hf=name_from_hf, name_to_hf=lambda name: name,
    tensor_from_hf=tensor_from_hf, tensor_to_hf=tensor_to_hf,
    # checkpoints of hpcllm <= 0.2 (one model.safetensors) kept HF's q|k|v row order
    tensor_from_legacy=lambda name, t, cfg: qkv_to_head_major(t, cfg.n_head) if ".attn.c_attn." in name else t,
)
