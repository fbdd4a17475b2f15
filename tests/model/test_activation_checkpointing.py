"""train.activation_checkpointing: every family's blocks are recomputed in backward (each block's
forward runs twice per step), and the loss and gradients are those of the plain model."""

import pytest
import torch

from hpcllm.model import build_model
from hpcllm.model.config import ModelConfig

CONFIGS = {
    "gpt2": ModelConfig(arch="gpt2", size="custom", n_layer=3, n_head=2, n_embd=32, block_size=32, vocab_size=97,
                        dropout=0.0),
    "llama": ModelConfig(arch="llama", size="custom", n_layer=3, n_head=4, n_kv_head=2, n_embd=32, block_size=32,
                         vocab_size=97),
}


def _grads(model, idx, tgt):
    model.zero_grad(set_to_none=True)
    _, loss = model(idx, tgt)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_recomputed_blocks_give_the_same_loss_and_gradients(arch):
    cfg = CONFIGS[arch]
    cfg.validate()
    torch.manual_seed(0)
    model = build_model(cfg).init_weights(seed=1).train()
    idx = torch.randint(0, 97, (2, 16))
    tgt = torch.randint(0, 97, (2, 16))
    plain_loss, plain = _grads(model, idx, tgt)

    calls = []
    hooks = [b.register_forward_pre_hook(lambda *_: calls.append(1)) for b in model.blocks()]
    model.activation_checkpointing = True
    ckpt_loss, ckpt = _grads(model, idx, tgt)
    for h in hooks:
        h.remove()

    assert len(calls) == 2 * cfg.n_layer  # forward, and again in backward
    assert torch.equal(plain_loss, ckpt_loss)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-6, atol=1e-7, msg=name)


def test_evaluation_does_not_recompute():
    model = build_model(CONFIGS["llama"]).init_weights(seed=1).eval()
    model.activation_checkpointing = True
    calls = []
    for b in model.blocks():
        b.register_forward_pre_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 8)))
    assert len(calls) == CONFIGS["llama"].n_layer
