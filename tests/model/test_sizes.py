"""Absurd or oversized model sizes are refused from the sizes alone, before anything is allocated:
one line naming the field (a config.json: exit 5; the spec: exit 2), never the allocator's traceback."""

import json
import subprocess
import sys
import time

import pytest
import torch

from hpcllm.config import load_spec
from hpcllm.errors import ConfigError, DataError
from hpcllm.model.hf import read_config
from hpcllm.train.trainer import build_model

LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64, "intermediate_size": 128,
         "max_position_embeddings": 128, "vocab_size": 512, "rms_norm_eps": 1e-5}


def model_dir(tmp_path, **sizes):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**LLAMA, **sizes}))
    return d


def test_a_config_json_beyond_any_real_model_is_refused_naming_the_field(tmp_path):
    d = model_dir(tmp_path, vocab_size=1_000_000_000_000)
    with pytest.raises(DataError, match=r"config.json: vocab_size=1000000000000 is beyond any real model"):
        read_config(d)
    spec = tmp_path / "plan.yaml"
    spec.write_text(json.dumps({"kind": "train", "run_dir": str(tmp_path / "run"), "model": {"init": str(d)}}))
    p = subprocess.run([sys.executable, "-m", "hpcllm.cli", "plan", str(spec), "--world", "2"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 5, p.stderr
    assert "vocab_size=1000000000000" in p.stderr and "Traceback" not in p.stderr


def test_a_legal_model_too_big_for_this_rank_is_refused_before_allocating(tmp_path):
    # 64 layers of width 16384 and a 256k vocabulary: ~220B parameters, legal sizes, no machine here holds them
    d = model_dir(tmp_path, num_hidden_layers=64, hidden_size=16384, num_attention_heads=128,
                  num_key_value_heads=8, intermediate_size=53248, vocab_size=262144)
    spec = load_spec(None, ["kind=train", f"run_dir={tmp_path / 'run'}", f"model.init={d}"])
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=r"config.json: n_layer=64, n_embd=16384.*B parameters, whose weights, "
                                        r"gradients and AdamW state need .* GiB per rank, more than"):
        build_model(spec, 512, torch.device("cpu"))
    # a spec's own sizes: a config error naming the spec's model section
    spec = load_spec(None, ["kind=train", f"run_dir={tmp_path / 'run'}", "model.arch=llama", "model.size=custom",
                            "model.n_layer=64", "model.n_head=128", "model.n_kv_head=8", "model.n_embd=16384",
                            "model.ffn_dim=53248", "model.block_size=128"])
    with pytest.raises(ConfigError, match="the spec's model section: n_layer=64"):
        build_model(spec, 262144, torch.device("cpu"))
    assert time.perf_counter() - t0 < 5  # refused from the sizes: nothing was allocated or drawn
