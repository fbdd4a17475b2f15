"""Models built on the meta device (hpcllm.model.build_model_on_meta): shapes only, the constructors'
default initializers skipped — what every inference rank and every sharded training rank builds first."""

import subprocess
import sys

import pytest
import torch

from hpcllm.model import ModelConfig, build_model, build_model_on_meta
from hpcllm.model.base import meta_device

CONFIGS = {"gpt2": dict(size="custom", n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=258),
           "llama": dict(arch="llama", size="custom", n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ffn_dim=48,
                         block_size=64, vocab_size=258)}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_a_model_built_on_meta_then_initialized_equals_one_built_on_the_cpu(arch):
    cfg = ModelConfig(**CONFIGS[arch]).resolve()
    meta = build_model_on_meta(cfg)
    assert all(p.is_meta for p in meta.parameters())
    got = meta.materialize("cpu").init_weights(7).state_dict()
    want = build_model(cfg).init_weights(7).state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_only_the_initializers_are_skipped_and_only_inside():
    with meta_device():
        t = torch.nn.init.normal_(torch.empty(3))  # returned untouched
        assert t.is_meta and torch.ones(2).is_meta
    x = torch.nn.init.ones_(torch.empty(3))
    assert not x.is_meta and torch.equal(x, torch.ones(3))


def test_building_on_meta_does_not_import_dynamo():
    """A random fill on meta runs a Python reference behind torch._disable_dynamo, whose first call imports
    torch._dynamo: ~1.5 s of an inference rank's start, for values that are never computed."""
    code = ("import sys; from hpcllm.model import ModelConfig, build_model_on_meta; "
            f"build_model_on_meta(ModelConfig(**{CONFIGS['llama']!r}).resolve()); "
            "print('torch._dynamo' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "False", p.stderr[-2000:]
