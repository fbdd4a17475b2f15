"""The parameter shapes worked out from a config without torch (hpcllm.model.shapes: what `hpcllm
plan` counts) are those of the model the family builds — names, order, shapes, the tied weight, the
stage boundaries — for every family and the options that change its parameters (biases, tying,
grouped-query attention, q/k norms, head_dim); and what the estimate reads from them (each stage's
parameters, each tensor's tp split) is what the pipeline cut and the tp plan actually do."""

import json

import torch

from hpcllm.model import ModelConfig, build_model
from hpcllm.model.hf_config import read_config
from hpcllm.model.registry import FAMILIES
from hpcllm.model.shapes import model_shapes, parameter_shapes
from hpcllm.parallel.estimate import estimate_memory, holdings, stage_parameter_names
from hpcllm.parallel.families import tp_plan
from hpcllm.parallel.layout import rank_stages
from hpcllm.parallel.stages import StageModule

CONFIGS = {
    "gpt2 tiny": ModelConfig(arch="gpt2", size="tiny", vocab_size=97),
    "gpt2 no bias": ModelConfig(arch="gpt2", size="custom", n_layer=3, n_head=2, n_embd=32, block_size=16,
                                vocab_size=61, bias=False, ffn_dim=72),
    "llama tiny (GQA 4:2)": ModelConfig(arch="llama", size="tiny", vocab_size=97),
    "llama tied": ModelConfig(arch="llama", size="custom", n_layer=3, n_head=4, n_kv_head=1, n_embd=32,
                              block_size=16, vocab_size=61, tie_embeddings=True),
    "qwen2-like (qkv bias, tied)": ModelConfig(arch="llama", size="custom", n_layer=2, n_head=4, n_kv_head=2,
                                               n_embd=32, block_size=16, vocab_size=61, qkv_bias=True,
                                               tie_embeddings=True, ffn_dim=40),
    "qwen3-like (q/k norm, head_dim)": ModelConfig(arch="llama", size="custom", n_layer=5, n_head=6, n_kv_head=3,
                                                   n_embd=48, head_dim=24, block_size=16, vocab_size=61,
                                                   qk_norm=True),
}
L = {"num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 32,
     "intermediate_size": 48, "max_position_embeddings": 32, "vocab_size": 53}
HF_CONFIGS = {
    "gpt2": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 2, "n_head": 2, "n_embd": 16,
             "n_positions": 32, "vocab_size": 53},
    "llama": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **L},
    "mistral": {"model_type": "mistral", "architectures": ["MistralForCausalLM"], **L, "sliding_window": None},
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], **L, "tie_word_embeddings": True},
    "qwen3": {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], **L, "head_dim": 16},
}


def all_configs(tmp_path) -> dict[str, ModelConfig]:
    out = {name: cfg.resolve() for name, cfg in CONFIGS.items()}
    for name, raw in HF_CONFIGS.items():  # as `hpcllm plan` reads a model.init directory
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(raw))
        out[f"HF {name}"] = read_config(d)[1]
    return out


def on_meta(cfg: ModelConfig):
    with torch.device("meta"):
        return build_model(cfg)


def test_every_family_is_covered():
    assert {cfg.arch for cfg in CONFIGS.values()} == set(FAMILIES)
    hf_types = {t for f in FAMILIES.values() for t in f.hf_model_types}
    assert hf_types == {raw["model_type"] for raw in HF_CONFIGS.values()}


def test_the_shapes_from_the_config_are_the_built_models(tmp_path):
    configs = all_configs(tmp_path)
    for name, cfg in configs.items():
        model, shapes = on_meta(cfg), parameter_shapes(cfg)
        assert list(shapes.params) == [(n, tuple(p.shape)) for n, p in model.named_parameters()], name
        assert model_shapes(model) == shapes, name  # the tied names, stage boundaries, lookup-only ones too
        assert shapes.num_params() == model.num_params() and shapes.num_params(False) == model.num_params(False)
    tied = {name: parameter_shapes(cfg).tied for name, cfg in configs.items()}
    assert tied["gpt2 tiny"] == (("lm_head.weight", "transformer.wte.weight"),)
    assert tied["llama tiny (GQA 4:2)"] == () and tied["HF qwen2"] == (("lm_head.weight", "model.embed_tokens.weight"),)


def test_each_stages_parameters_are_what_the_pipeline_cut_keeps():
    """Worked out from the names alone, against the parameters StageModule (the real cut) keeps."""
    for name, cfg in CONFIGS.items():
        cfg = cfg.resolve()
        shapes = parameter_shapes(cfg)
        for pp, v in ((2, 1), (cfg.n_layer, 1), (2, 2)):
            if pp * v > cfg.n_layer:
                continue
            for pp_rank in range(pp):
                stages = rank_stages(pp_rank, pp, v)
                kept = [n for n, _ in StageModule(on_meta(cfg), stages, pp * v).named_parameters()]
                assert stage_parameter_names(shapes, stages, pp * v) == kept, (name, pp, v, pp_rank)


def _split_dims_of_the_tp_plan(model, sequence_parallel: bool) -> list:
    """Which dimension of each parameter the family's tp plan (torch's styles) splits: a column style
    its rows (weight and bias), a row style an embedding's rows or a linear layer's columns (its bias
    whole); the sequence-parallel and other styles nothing."""
    plan = tp_plan(model, True, sequence_parallel)
    dims = []
    for name, _ in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        style = type(plan.get(module)).__name__
        if style == "ColwiseParallel":
            dims.append(0)
        elif style == "RowwiseParallel":
            embedding = isinstance(model.get_submodule(module), torch.nn.Embedding)
            dims.append(None if name.endswith("bias") else 0 if embedding else 1)
        else:
            dims.append(None)
    return dims


def test_each_tensors_tp_split_is_the_tp_plans():
    for name, cfg in CONFIGS.items():
        cfg = cfg.resolve()
        model = on_meta(cfg)
        dims = [h.tp_dim for h in holdings(parameter_shapes(cfg))]
        assert any(d == 0 for d in dims) and any(d == 1 for d in dims) and None in dims, name
        for sp in (False, True):
            assert dims == _split_dims_of_the_tp_plan(model, sp), (name, sp)


def test_the_estimate_of_the_shapes_is_the_estimate_of_the_model():
    """The trainer passes its built model, `hpcllm plan` the shapes: one estimate, the same figures."""
    for name, cfg in CONFIGS.items():
        cfg = cfg.resolve()
        model, shapes = on_meta(cfg), parameter_shapes(cfg)
        for shard, tp, dp, pp, v in (("none", 1, 1, 1, 1), ("optimizer", 2, 2, 1, 1), ("full", 2, 3, 1, 1),
                                     ("none", 1, 2, 2, 1), ("full", 2, 2, 2, 1), ("optimizer", 1, 2, 2, 2)):
            if pp * v > cfg.n_layer:
                continue
            for pp_rank in range(pp):
                args = (shard, tp, dp, pp, pp_rank, v)
                assert estimate_memory(shapes, *args) == estimate_memory(model, *args), (name, args)
