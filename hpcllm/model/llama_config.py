"""The `llama` family without torch: its config.json mapping (Llama, Mistral, Qwen2, Qwen3) and the
parameters it builds (hpcllm/model/llama.py is the model). Read by `hpcllm plan` and the HF
loader's config step on a login node; the model class takes its module paths from here.
"""

from __future__ import annotations

from hpcllm.model.config import ModelConfig
from hpcllm.model.shapes import ModelShapes

BLOCKS = "model.layers"
EMBEDDING_MODULES = ("model.embed_tokens",)
HEAD_MODULES = ("model.norm", "lm_head")


def parameter_shapes(c: ModelConfig) -> ModelShapes:
    """Llama's parameters in its named_parameters() order: the token embedding, each layer (RMSNorm,
    q/k/v projections with `qkv_bias` biases, the output projection, per-head q/k RMSNorms with
    `qk_norm`, RMSNorm, the SwiGLU MLP's gate, up and down), the final RMSNorm and the output head
    (the token embedding under `tie_embeddings`)."""
    E, F, D = c.n_embd, c.ffn_dim, c.head_dim
    q, kv = c.n_head * D, c.n_kv_head * D

    def linear(name: str, out: int, inp: int, bias: bool = False) -> list:
        return [(f"{name}.weight", (out, inp))] + ([(f"{name}.bias", (out,))] if bias else [])

    params = [("model.embed_tokens.weight", (c.vocab_size, E))]
    for i in range(c.n_layer):
        b = f"{BLOCKS}.{i}"
        params += [(f"{b}.input_layernorm.weight", (E,))]
        attn = f"{b}.self_attn"
        params += (linear(f"{attn}.q_proj", q, E, c.qkv_bias) + linear(f"{attn}.k_proj", kv, E, c.qkv_bias)
                   + linear(f"{attn}.v_proj", kv, E, c.qkv_bias) + linear(f"{attn}.o_proj", E, q))
        if c.qk_norm:
            params += [(f"{attn}.q_norm.weight", (D,)), (f"{attn}.k_norm.weight", (D,))]
        params += [(f"{b}.post_attention_layernorm.weight", (E,))]
        params += linear(f"{b}.mlp.gate_proj", F, E) + linear(f"{b}.mlp.up_proj", F, E)
        params += linear(f"{b}.mlp.down_proj", E, F)
    params += [("model.norm.weight", (E,))]
    if c.tie_embeddings:
        tied, lookup_only = (("lm_head.weight", "model.embed_tokens.weight"),), ()
    else:
        params += [("lm_head.weight", (c.vocab_size, E))]
        tied, lookup_only = (), ("model.embed_tokens.weight",)
    return ModelShapes(config=c, params=tuple(params), tied=tied, blocks=BLOCKS, embedding_modules=EMBEDDING_MODULES,
                       head_modules=HEAD_MODULES, lookup_only=lookup_only)


ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def rope_from_hf(c: dict) -> tuple[float, dict]:
    """(theta, scaling) from transformers 4.x (`rope_theta` + `rope_scaling`) or 5.x
    (`rope_parameters`) config.json."""
    params = c.get("rope_parameters")
    if isinstance(params, dict) and params:  # transformers 5.x
        if any(isinstance(v, dict) for v in params.values()):
            raise ValueError(f"rope_parameters per layer type ({', '.join(params)}) are not implemented")
        scaling = dict(params)
        theta = scaling.pop("rope_theta", c.get("rope_theta", 10000.0))
    else:  # transformers 4.x
        theta, scaling = c.get("rope_theta", 10000.0), dict(c.get("rope_scaling") or {})
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"rope_scaling type {kind!r} is not implemented (implemented: default, linear, llama3)")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor={scaling['partial_rotary_factor']} is not implemented")
    if kind == "default":
        return float(theta), {}
    keep = ("factor",) if kind == "linear" else ("factor", "low_freq_factor", "high_freq_factor",
                                                 "original_max_position_embeddings")
    missing = [k for k in keep if k not in scaling]
    if missing:
        raise ValueError(f"rope_scaling type {kind} lacks {', '.join(missing)}")
    return float(theta), {"type": kind, **{k: scaling[k] for k in keep}}


def config_from_hf(c: dict) -> ModelConfig:
    """Llama/Mistral/Qwen2/Qwen3 config.json -> ModelConfig. What changes the model and is not
    implemented is refused, naming the field and the value."""
    mt = c.get("model_type")
    archs = c.get("architectures") or []
    bad = [a for a in archs if a not in ARCHITECTURES]
    if bad:
        raise ValueError(f"architectures={bad!r}: only {', '.join(ARCHITECTURES)} load as the llama family")
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={c['hidden_act']!r} is not implemented (only 'silu')")
    for key in ("attention_bias", "mlp_bias"):  # biases on o_proj / the MLP: not in this family
        if c.get(key):
            raise ValueError(f"{key}={c[key]!r} is not implemented")
    context = c["max_position_embeddings"]
    window = c.get("sliding_window")
    if mt in ("qwen2", "qwen3") and not c.get("use_sliding_window", False):
        window = None
    if window is not None and window < context:
        raise ValueError(f"sliding_window={window} is shorter than the context ({context}): sliding-window "
                         "attention is not implemented")
    heads = c["num_attention_heads"]
    theta, scaling = rope_from_hf(c)
    return ModelConfig(
        arch="llama", size="custom", n_layer=c["num_hidden_layers"], n_head=heads,
        n_kv_head=c.get("num_key_value_heads") or heads, n_embd=c["hidden_size"],
        head_dim=c.get("head_dim") or c["hidden_size"] // heads, ffn_dim=c["intermediate_size"],
        block_size=context, vocab_size=c["vocab_size"], norm_eps=c.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)), qkv_bias=mt == "qwen2", qk_norm=mt == "qwen3",
        rope_theta=theta, rope_scaling=scaling, dropout=0.0, activation="silu", bias=False,
    )


def config_to_hf(c: ModelConfig) -> dict:
    """The HF class that has exactly this model: Qwen3 (q/k norm), Qwen2 (q/k/v bias) or Llama."""
    kind, arch = ("qwen3", "Qwen3ForCausalLM") if c.qk_norm else \
        ("qwen2", "Qwen2ForCausalLM") if c.qkv_bias else ("llama", "LlamaForCausalLM")
    out = {
        "architectures": [arch], "model_type": kind, "vocab_size": c.vocab_size, "hidden_size": c.n_embd,
        "intermediate_size": c.ffn_dim, "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head, "head_dim": c.head_dim, "max_position_embeddings": c.block_size,
        "rms_norm_eps": c.norm_eps, "hidden_act": "silu", "tie_word_embeddings": c.tie_embeddings,
        "rope_theta": c.rope_theta, "rope_scaling": None, "attention_dropout": 0.0, "torch_dtype": "float32",
    }
    if c.rope_scaling:
        kind_ = c.rope_scaling.get("type", c.rope_scaling.get("rope_type"))
        out["rope_scaling"] = {"rope_type": kind_, **{k: v for k, v in c.rope_scaling.items()
                                                      if k not in ("type", "rope_type")}}
    if kind == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:
        out.update(use_sliding_window=False, sliding_window=None)
        if kind == "qwen3":
            out["attention_bias"] = False
    return out
