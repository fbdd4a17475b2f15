"""The model families: which `model.arch` values exist, their presets and the config fields each one
implements — all without importing torch, so a job spec is checked in full by `hpcllm config` and
`hpcllm submit` on a login node. The model code of a family lives in its own module, imported on
first use; the trainer, the engine and the checkpoints only ever ask this registry. What needs no
torch — the config.json mapping and the parameters' names and shapes (`hpcllm plan` counts them on
a login node) — lives in the family's `<family>_config.py`.

Adding a family: write hpcllm/model/<family>_config.py (`config_from_hf`, `config_to_hf`,
`parameter_shapes`, see llama_config.py) and hpcllm/model/<family>.py (an nn.Module and a `FAMILY`
with its tensor mapping, see llama.py), and add one entry below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

# presets: size name -> sizes (the spec's explicit values win)
GPT2_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),  # ~0.9M + embeddings: the CPU demo
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),  # ~10M: the CPU training benchmark
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),  # 1.5B
}
LLAMA_PRESETS: dict[str, dict[str, Any]] = {
    # a Llama-shaped model for tests and the CPU demo: GQA 4:2, SwiGLU, RoPE
    "tiny": dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=128, ffn_dim=352, block_size=256),
    # ~100M with GQA: the CPU inference benchmark
    "100m": dict(n_layer=12, n_head=12, n_kv_head=4, n_embd=768, ffn_dim=2048, block_size=1024),
    # the shapes of the released models (weights come from their HF directories)
    "llama3.2-1b": dict(n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, ffn_dim=8192, block_size=131072,
                        vocab_size=128256, norm_eps=1e-5, tie_embeddings=True, rope_theta=500000.0,
                        rope_scaling={"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama3-8b": dict(n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, ffn_dim=14336, block_size=8192,
                      vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0),
    "qwen2.5-0.5b": dict(n_layer=24, n_head=14, n_kv_head=2, n_embd=896, ffn_dim=4864, block_size=32768,
                         vocab_size=151936, norm_eps=1e-6, qkv_bias=True, tie_embeddings=True,
                         rope_theta=1000000.0),
    "qwen3-0.6b": dict(n_layer=28, n_head=16, n_kv_head=8, n_embd=1024, head_dim=128, ffn_dim=3072,
                       block_size=40960, vocab_size=151936, norm_eps=1e-6, qk_norm=True, tie_embeddings=True,
                       rope_theta=1000000.0),
}


@dataclass(frozen=True)
class FamilyInfo:
    module: str  # defines FAMILY: the model class and the HF mapping (imports torch)
    config_module: str  # config_from_hf, config_to_hf, parameter_shapes (imports no torch)
    presets: dict[str, dict[str, Any]]
    # optional fields this family implements; a value given for any other one is refused
    fields: frozenset[str]
    # values of optional fields left unset (None); callables get the config
    defaults: dict[str, Any] = field(default_factory=dict)
    hf_model_types: tuple[str, ...] = ()  # config.json `model_type` values it loads


def _llama_ffn(c) -> int:  # LLaMA's rule: 2/3 of 4 * hidden, rounded up to a multiple of 64
    return -(-(8 * c.n_embd // 3) // 64) * 64


FAMILIES: dict[str, FamilyInfo] = {
    "gpt2": FamilyInfo("hpcllm.model.gpt", "hpcllm.model.gpt_config", GPT2_PRESETS,
                       frozenset({"ffn_dim", "bias", "norm_eps", "activation"}),
                       dict(bias=True, norm_eps=1e-5, activation="gelu_tanh", tie_embeddings=True,
                            ffn_dim=lambda c: 4 * c.n_embd), ("gpt2",)),
    "llama": FamilyInfo("hpcllm.model.llama", "hpcllm.model.llama_config", LLAMA_PRESETS,
                        frozenset({"n_kv_head", "head_dim", "ffn_dim", "qkv_bias", "qk_norm", "norm_eps",
                                   "tie_embeddings", "rope_theta", "rope_scaling"}),
                        dict(bias=False, qkv_bias=False, qk_norm=False, norm_eps=1e-5, tie_embeddings=False,
                             activation="silu", rope_theta=10000.0, ffn_dim=_llama_ffn),
                        ("llama", "mistral", "qwen2", "qwen3")),
}
# Beyond any released model by a wide margin: a config.json (or spec) past one of these is a mistake or
# an attack, refused before anything is allocated (a 10^12 vocabulary would otherwise end in the
# allocator's traceback, or in a node swapping itself to death)
SIZE_LIMITS = {"vocab_size": 2**24, "n_embd": 2**17, "ffn_dim": 2**20, "n_layer": 2**12, "n_head": 2**12,
               "n_kv_head": 2**12, "head_dim": 2**13, "block_size": 2**24}
MAX_PARAMS = 10**13  # 10T: ten times the largest dense models

OPTIONAL = ("n_kv_head", "head_dim", "ffn_dim", "bias", "qkv_bias", "qk_norm", "norm_eps", "tie_embeddings",
            "activation", "rope_theta", "rope_scaling")
ROPE_TYPES = ("default", "linear", "llama3")


def family_info(arch: str) -> FamilyInfo:
    if arch not in FAMILIES:
        raise ValueError(f"arch must be one of {', '.join(FAMILIES)}, got {arch!r}")
    return FAMILIES[arch]


def arch_for_model_type(model_type: str) -> str | None:
    return next((a for a, f in FAMILIES.items() if model_type in f.hf_model_types), None)


def get_family(arch: str):
    """The family's FAMILY object (imports its model code, and torch)."""
    return importlib.import_module(family_info(arch).module).FAMILY


def get_family_config(arch: str):
    """The family's torch-free module: `config_from_hf`, `config_to_hf`, `parameter_shapes`."""
    return importlib.import_module(family_info(arch).config_module)


def check_config(c) -> None:
    """Checks of a (preset-filled) ModelConfig that need no torch: fields the family does not
    implement, sizes that do not fit together. Raises ValueError naming the field."""
    info = family_info(c.arch)
    derived = {"n_kv_head": c.n_head, "head_dim": c.n_embd // c.n_head if c.n_embd and c.n_head else None}
    for name in OPTIONAL:
        value = getattr(c, name)
        default = derived.get(name, info.defaults.get(name))
        if name not in info.fields and value not in (None, {}) and value != default:
            raise ValueError(f"arch {c.arch} does not implement {name} (got {value!r})")
    for k in ("n_layer", "n_head", "n_kv_head", "n_embd", "head_dim", "ffn_dim", "block_size", "vocab_size"):
        v = getattr(c, k)
        if v is not None and v < 1:
            raise ValueError(f"{k} must be >= 1, got {v}")
        if v is not None and v > SIZE_LIMITS[k]:
            raise ValueError(f"{k}={v} is beyond any real model (limit {SIZE_LIMITS[k]}): refused before allocating")
    n = param_count(c)
    if n is not None and n > MAX_PARAMS:
        raise ValueError(f"the sizes (n_layer={c.n_layer}, n_embd={c.n_embd}, ffn_dim={c.ffn_dim}, vocab_size="
                         f"{c.vocab_size}) make {n / 1e12:.1f}T parameters, beyond the limit of {MAX_PARAMS / 1e12:.0f}T")
    if c.n_head and c.n_embd and c.head_dim is None and c.n_embd % c.n_head:
        raise ValueError(f"n_embd ({c.n_embd}) must be divisible by n_head ({c.n_head})"
                         + (" (or set head_dim)" if "head_dim" in info.fields else ""))
    if c.n_head and c.n_kv_head and c.n_head % c.n_kv_head:
        raise ValueError(f"n_head ({c.n_head}) must be a multiple of n_kv_head ({c.n_kv_head})")
    if c.rope_scaling:
        kind = c.rope_scaling.get("type", c.rope_scaling.get("rope_type"))
        if kind not in ROPE_TYPES:
            raise ValueError(f"rope_scaling type {kind!r} is not implemented (implemented: {', '.join(ROPE_TYPES)})")
        need = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                  "original_max_position_embeddings")}.get(kind, ())
        missing = [k for k in need if k not in c.rope_scaling]
        if missing:
            raise ValueError(f"rope_scaling type {kind} needs {', '.join(missing)}")


def param_count(c) -> int | None:
    """About how many parameters the sizes make (the matrices; norms and biases are noise), without
    building anything; None while a size is unknown."""
    if None in (c.n_layer, c.n_head, c.n_embd, c.vocab_size):
        return None
    head_dim = c.head_dim or c.n_embd // c.n_head
    kv = c.n_kv_head or c.n_head
    ffn = c.ffn_dim or 4 * c.n_embd
    attention = c.n_embd * head_dim * (2 * c.n_head + 2 * kv)
    mlp = (3 if c.arch == "llama" else 2) * c.n_embd * ffn
    tied = c.tie_embeddings if c.tie_embeddings is not None else c.arch == "gpt2"
    embeddings = c.vocab_size * c.n_embd * (1 if tied else 2)
    return c.n_layer * (attention + mlp) + embeddings


def fill_defaults(c) -> None:
    """Set every unset optional field to the family's default (in place)."""
    info = family_info(c.arch)
    for name, value in info.defaults.items():
        if getattr(c, name) is None:
            setattr(c, name, value(c) if callable(value) else value)
    if c.n_kv_head is None:
        c.n_kv_head = c.n_head
    if c.head_dim is None:
        c.head_dim = c.n_embd // c.n_head
