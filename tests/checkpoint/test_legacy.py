"""Single-file checkpoints of an earlier hpcllm (model.safetensors + state.pt, GPT-2's q|k|v rows in
HF's order) still load for export and inference, in today's layout, with the same logits."""

import json

import torch
from safetensors.torch import save_file

from hpcllm.checkpoint import load_trained_model, read_checkpoint_model
from hpcllm.model import build_model
from hpcllm.model.config import ModelConfig
from hpcllm.model.gpt import qkv_from_head_major


def test_a_legacy_gpt2_checkpoint_reads_in_the_head_major_layout(tmp_path):
    cfg = ModelConfig(arch="gpt2", size="custom", n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=61)
    cfg.validate()
    model = build_model(cfg).init_weights(seed=3).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # biases too
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000005"
    ckpt.mkdir(parents=True)
    old = {n: (qkv_from_head_major(t, cfg.n_head) if ".attn.c_attn." in n else t).contiguous()
           for n, t in model.state_dict().items() if n != "lm_head.weight"}
    save_file(old, str(ckpt / "model.safetensors"))
    torch.save({"step": 5}, ckpt / "state.pt")
    (ckpt / "meta.json").write_text(json.dumps({"step": 5, "model": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
                                                "spec": {"model": {}, "data": {"dataset": str(tmp_path / "ds")}}}))

    tensors = read_checkpoint_model(ckpt)
    own = model.state_dict()
    assert all(torch.equal(tensors[n], own[n]) for n in tensors)
    assert not torch.equal(tensors["transformer.h.0.attn.c_attn.weight"], old["transformer.h.0.attn.c_attn.weight"])

    loaded, _, dataset = load_trained_model(tmp_path / "run")
    idx = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(idx)[0], model(idx)[0], rtol=0, atol=0)
    assert dataset == str(tmp_path / "ds")

    # and streamed one tensor at a time into a quantized model (infer.quantize), the same as quantizing it loaded
    from functools import partial

    from hpcllm.checkpoint import stream_checkpoint, trained_model_on_meta
    from hpcllm.infer.quantize import load_quantized, quantize_model

    meta_model, _, _, found = trained_model_on_meta(tmp_path / "run")
    streamed = load_quantized(meta_model, "int8", "cpu", partial(stream_checkpoint, found)).state_dict()
    want = quantize_model(loaded, "int8").state_dict()
    assert streamed.keys() == want.keys() and all(torch.equal(streamed[k], want[k]) for k in want)
