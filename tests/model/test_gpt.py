"""hpcllm's GPT against transformers' GPT2LMHeadModel as the numerical oracle (random weights, no download)."""

import pytest
import torch

from hpcllm.model import ModelConfig, build_model, load_hf_model, save_hf_model
from hpcllm.model.hf import WeightsError

transformers = pytest.importorskip("transformers")


def hf_model(seed=0, vocab=300):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=vocab, n_positions=64,
                                  resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    hf = hf_model()
    hf.save_pretrained(d, safe_serialization=True)
    ours, cfg = load_hf_model(d)
    return hf, ours.eval(), d


def test_logits_and_loss_match_hf(pair):
    hf, ours, _ = pair
    idx = torch.randint(0, 300, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx, labels=idx)
        logits, _ = ours(idx)
        _, loss = ours(idx[:, :-1], idx[:, 1:])
    assert (logits - ref.logits).abs().max().item() <= 1e-4
    assert abs(loss.item() - ref.loss.item()) <= 1e-5


def test_export_roundtrip_through_transformers(pair, tmp_path):
    _, ours, _ = pair
    torch.manual_seed(3)
    fresh = build_model(ModelConfig(size="custom", n_layer=2, n_head=4, n_embd=64, block_size=64,
                                    vocab_size=300).resolve()).init_weights(5)
    save_hf_model(fresh.eval(), tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        assert (fresh(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-4


def test_bad_weight_files_are_named(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, d = pair
    tensors = load_file(str(d / "model.safetensors"))
    missing = {k: v for k, v in tensors.items() if "h.1.mlp.c_fc.weight" not in k}
    (tmp_path / "a").mkdir()
    save_file(missing, str(tmp_path / "a" / "model.safetensors"))
    (tmp_path / "a" / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(WeightsError, match=r"a: tensor\(s\) missing from the weights: transformer.h.1.mlp.c_fc.weight"):
        load_hf_model(tmp_path / "a")
    wrong = dict(tensors)
    key = [k for k in tensors if k.endswith("h.0.attn.c_proj.weight")][0]
    wrong[key] = torch.zeros(3, 3)
    (tmp_path / "b").mkdir()
    save_file(wrong, str(tmp_path / "b" / "model.safetensors"))
    (tmp_path / "b" / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(WeightsError, match=r"'transformer.h.0.attn.c_proj.weight' has shape \(3, 3\), config.json implies \(64, 64\)"):
        load_hf_model(tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "model.safetensors").write_bytes(b"\x80\x04 this is a pickle, not safetensors")
    (tmp_path / "c" / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(WeightsError, match="c/model.safetensors: not a readable safetensors file"):
        load_hf_model(tmp_path / "c" / "model.safetensors")
