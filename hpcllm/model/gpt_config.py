"""The `gpt2` family without torch: its config.json mapping and the parameters it builds
(hpcllm/model/gpt.py is the model). Read by `hpcllm plan` and the HF loader's config step on a
login node; the model class takes its module paths from here, so the two cannot drift apart.
"""

from __future__ import annotations

from hpcllm.model.config import ModelConfig
from hpcllm.model.shapes import ModelShapes

BLOCKS = "transformer.h"
EMBEDDING_MODULES = ("transformer.wte", "transformer.wpe", "transformer.drop")
HEAD_MODULES = ("transformer.ln_f", "lm_head")

_HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def parameter_shapes(c: ModelConfig) -> ModelShapes:
    """GPT's parameters in its named_parameters() order: the token and position embeddings, each
    block (LayerNorm, attention's fused q|k|v and output, LayerNorm, MLP; biases with `bias`), the
    final LayerNorm; the output head is the token embedding (always tied in this family)."""
    E, F = c.n_embd, c.ffn_dim

    def linear(name: str, out: int, inp: int) -> list:
        return [(f"{name}.weight", (out, inp))] + ([(f"{name}.bias", (out,))] if c.bias else [])

    def norm(name: str) -> list:
        return [(f"{name}.weight", (E,))] + ([(f"{name}.bias", (E,))] if c.bias else [])

    params = [("transformer.wte.weight", (c.vocab_size, E)), ("transformer.wpe.weight", (c.block_size, E))]
    for i in range(c.n_layer):
        b = f"{BLOCKS}.{i}"
        params += (norm(f"{b}.ln_1") + linear(f"{b}.attn.c_attn", 3 * E, E) + linear(f"{b}.attn.c_proj", E, E)
                   + norm(f"{b}.ln_2") + linear(f"{b}.mlp.c_fc", F, E) + linear(f"{b}.mlp.c_proj", E, F))
    params += norm("transformer.ln_f")
    return ModelShapes(config=c, params=tuple(params), tied=(("lm_head.weight", "transformer.wte.weight"),),
                       blocks=BLOCKS, embedding_modules=EMBEDDING_MODULES, head_modules=HEAD_MODULES,
                       lookup_only=("transformer.wpe.weight",))


def config_from_hf(c: dict) -> ModelConfig:
    """GPT2LMHeadModel's config.json. Whatever would change the logits and is not implemented is
    refused, naming the field (a wrong model that runs is worse than none)."""
    act = c.get("activation_function", "gelu_new")
    if act not in _HF_ACTIVATIONS:
        raise ValueError(f"activation_function={act!r} is not implemented (implemented: {', '.join(_HF_ACTIVATIONS)})")
    refused = {"scale_attn_weights": (c.get("scale_attn_weights", True), True),
               "scale_attn_by_inverse_layer_idx": (c.get("scale_attn_by_inverse_layer_idx", False), False),
               "add_cross_attention": (c.get("add_cross_attention", False), False),
               "tie_word_embeddings": (c.get("tie_word_embeddings", True), True)}
    for key, (value, supported) in refused.items():
        if value != supported:
            raise ValueError(f"{key}={value!r} is not implemented (only {supported!r})")
    n_embd = c["n_embd"]
    return ModelConfig(arch="gpt2", size="custom", n_layer=c["n_layer"], n_head=c["n_head"], n_embd=n_embd,
                       block_size=c["n_positions"], vocab_size=c["vocab_size"], ffn_dim=c.get("n_inner") or 4 * n_embd,
                       norm_eps=c.get("layer_norm_epsilon", 1e-5), activation=_HF_ACTIVATIONS[act], bias=True)


def config_to_hf(c: ModelConfig) -> dict:
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[c.activation]
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
        "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
        "n_head": c.n_head, "n_inner": c.ffn_dim, "activation_function": act, "layer_norm_epsilon": c.norm_eps,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": True,
        "scale_attn_weights": True, "torch_dtype": "float32",
    }
