"""The llama family against transformers as the numerical oracle: Llama (llama3 RoPE scaling, GQA),
Mistral, Qwen2 (q/k/v bias, tied embeddings), Qwen3 (per-head q/k RMSNorm, head_dim != hidden/heads)
— random weights saved by `save_pretrained` in several shards; no download."""

import json

import pytest
import torch

from hpcllm.model import load_hf_model, save_hf_model
from hpcllm.model.hf import WeightsError

transformers = pytest.importorskip("transformers")

V = 512
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, rms_norm_eps=1e-5)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(num_key_value_heads=1, sliding_window=None, tie_word_embeddings=False)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=True, rope_theta=1e6)),
}


def make_hf(kind, seed=0):
    cfg_cls, model_cls, extra = FAMILIES[kind]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**COMMON, **extra)).eval()
    with torch.no_grad():  # random biases and norm weights too, so every parameter matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    kind = request.param
    d = tmp_path_factory.mktemp(kind)
    hf = make_hf(kind)
    hf.save_pretrained(d, max_shard_size="100KB")  # several shards + index
    assert len(list(d.glob("model-*.safetensors"))) >= 2
    ours, cfg = load_hf_model(d)
    return kind, hf, ours.eval(), d


def test_config_maps_every_family_feature(pair):
    kind, hf, ours, _ = pair
    c = ours.config
    assert c.arch == "llama" and c.n_kv_head == hf.config.num_key_value_heads
    assert c.head_dim == (24 if kind == "qwen3" else 16)
    assert c.qkv_bias == (kind == "qwen2") and c.qk_norm == (kind == "qwen3")
    assert c.tie_embeddings == (kind in ("qwen2", "qwen3"))
    assert (c.rope_scaling.get("type") == "llama3") == (kind == "llama")
    # the cache holds the KV heads, not the query heads: (layer, block, slot, kv head, dim)
    assert ours.new_paged_kv_cache(3, 16, "cpu").k.shape == (2, 3, 16, c.n_kv_head, c.head_dim)


def test_logits_match_hf_at_every_position_of_sequences_of_mixed_lengths(pair):
    _, hf, ours, _ = pair  # up to 200 positions: RoPE (and Llama 3's scaled RoPE) far from the start
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in (1, 7, 30, 200):
            p = torch.randint(0, V, (1, n), generator=g)
            assert (ours(p)[0] - hf(p).logits).abs().max().item() <= 1e-4, n


def test_training_loss_matches_hf(pair):
    _, hf, ours, _ = pair
    idx = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(idx, labels=idx).loss
        _, loss = ours(idx[:, :-1], idx[:, 1:])
    assert abs(loss.item() - ref.item()) <= 1e-5


def test_export_loads_in_transformers_with_the_same_logits(pair, tmp_path):
    kind, _, ours, _ = pair
    save_hf_model(ours, tmp_path, max_shard_bytes=100_000, eos_ids=[3, 4])
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == [3, 4]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back).__name__ == {"llama": "LlamaForCausalLM", "mistral": "LlamaForCausalLM",
                                   "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[kind]
    idx = torch.randint(0, V, (2, 50), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (ours(idx)[0] - back(idx).logits).abs().max().item() <= 1e-4
    again, _ = load_hf_model(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(idx)[0], ours(idx)[0])


def test_transformers_4x_config_layout_loads_the_same_model(pair, tmp_path):
    kind, _, ours, d = pair
    if kind != "llama":
        pytest.skip("the rope layout is what differs")
    import shutil

    shutil.copytree(d, tmp_path / "v4")
    cfg = json.loads((d / "config.json").read_text())
    params = cfg.pop("rope_parameters")  # 5.x: {"rope_type", "rope_theta", factors...}
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = {"type": params.pop("rope_type"), **params}  # 4.x spelling: `type`
    (tmp_path / "v4" / "config.json").write_text(json.dumps(cfg))
    v4, c4 = load_hf_model(tmp_path / "v4")
    assert c4 == ours.config
    idx = torch.randint(0, V, (1, 30))
    with torch.no_grad():
        assert torch.equal(v4(idx)[0], ours(idx)[0])


def test_bf16_stays_bf16(pair):
    _, _, _, d = pair
    model, _ = load_hf_model(d, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def _variant(d, tmp_path, name, edit_config=None, drop_file=None):
    import shutil

    out = tmp_path / name
    shutil.copytree(d, out)
    if edit_config:
        cfg = json.loads((out / "config.json").read_text())
        edit_config(cfg)
        (out / "config.json").write_text(json.dumps(cfg))
    if drop_file:
        (out / drop_file).unlink()
    return out


def test_what_is_not_implemented_is_refused_naming_the_field(pair, tmp_path):
    kind, _, _, d = pair
    if kind != "mistral":
        pytest.skip("one family is enough for the refusals")
    cases = {
        "window": (lambda c: c.update(sliding_window=64), "sliding_window=64 is shorter than the context (256)"),
        "yarn": (lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
                 "rope_scaling type 'yarn' is not implemented"),
        "act": (lambda c: c.update(hidden_act="gelu"), "hidden_act='gelu' is not implemented"),
        "type": (lambda c: c.update(model_type="gemma"), "model_type='gemma' is not supported"),
        "arch": (lambda c: c.update(architectures=["MistralForSequenceClassification"]),
                 "architectures=['MistralForSequenceClassification']"),
        "bias": (lambda c: c.update(attention_bias=True), "attention_bias=True is not implemented"),
    }
    for name, (edit, message) in cases.items():
        with pytest.raises(WeightsError, match="config.json: " + message.replace("(", r"\(").replace(")", r"\)")
                           .replace("[", r"\[").replace("]", r"\]")):
            load_hf_model(_variant(d, tmp_path, name, edit))
    with pytest.raises(WeightsError, match="no config.json"):
        load_hf_model(_variant(d, tmp_path, "noconf", drop_file="config.json"))
    shard = sorted(d.glob("model-*.safetensors"))[0].name
    with pytest.raises(WeightsError, match=f"names {shard}, which is missing"):
        load_hf_model(_variant(d, tmp_path, "noshard", drop_file=shard))
    with pytest.raises(WeightsError, match=r"has shape \(512, 64\), config.json implies \(512, 80\)"):
        load_hf_model(_variant(d, tmp_path, "shape", lambda c: c.update(hidden_size=80, head_dim=16)))
