"""`hpcllm export`: a trained run of each family as an HF directory that transformers loads with the
same logits — weights, config, generation config and the dataset's tokenizer.

The inputs (a tokenizer, two datasets) and the refused second export run in one Python process
(`cli`, a CliSession: ~3 s of imports saved per command); the training and the export under test
are the real command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch


transformers = pytest.importorskip("transformers")


def hpcllm(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "hpcllm.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, cli):
    root = tmp_path_factory.mktemp("export")
    corpus = root / "corpus"
    corpus.mkdir()
    import json as js

    src = Path(js.__file__).parent  # real text: the json package's sources
    for p in sorted(src.glob("*.py")):
        (corpus / p.name).write_text(p.read_text())
    out = {}
    tok = root / "bpe.json"
    assert cli("tokenizer", "train", "--input", str(corpus), "--vocab-size", "400", "--output", str(tok)).returncode == 0
    for name, tokenizer in (("byte", "byte"), ("bpe", str(tok))):
        spec = root / f"prep_{name}.yaml"
        spec.write_text(json.dumps({"kind": "prepare", "run_dir": str(root / f"prep_{name}"),
                                    "data": {"inputs": [str(corpus)], "dataset": str(root / f"ds_{name}"),
                                             "tokenizer": tokenizer, "val_fraction": 0.1}}))
        p = cli("prepare", spec)
        assert p.returncode == 0, p.stderr
        out[name] = root / f"ds_{name}"
    return out


def train(tmp_path, dataset, arch, size="tiny"):
    spec = tmp_path / "train.yaml"
    spec.write_text(json.dumps({
        "kind": "train", "name": f"exp_{arch}", "run_dir": str(tmp_path / "run"), "data": {"dataset": str(dataset)},
        "model": {"arch": arch, "size": size, "block_size": 64},
        "train": {"max_steps": 3, "batch_size": 2, "seq_len": 32, "eval_interval": 0, "log_interval": 1,
                  "progress": False}}))
    p = hpcllm("train", str(spec))
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp_path / "run"


@pytest.mark.parametrize("arch, tok", [("llama", "bpe"), ("gpt2", "byte")])
def test_export_loads_in_transformers_with_the_same_logits_and_tokenizer(tmp_path, datasets, cli, arch, tok):
    from hpcllm.checkpoint import load_trained_model
    from hpcllm.data import load_tokenizer

    run = train(tmp_path, datasets[tok], arch)
    out = tmp_path / "hf"
    p = hpcllm("export", str(run), str(out), "--max-shard-size", "100KB")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) >= 2
    assert not list(tmp_path.glob("hf.tmp*"))
    ours, cfg, dataset = load_trained_model(run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours.eval()(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    mine = load_tokenizer(dataset)
    text = "def f(x):\n    return {'a': x}  # ünïcode\n"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == mine.encode(text)
    assert hf_tok.eos_token_id == mine.eos_id
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == mine.eos_id and generation["pad_token_id"] == mine.pad_id
    assert hf_tok.pad_token_id == mine.pad_id == hf.generation_config.pad_token_id
    again = cli("export", run, out)
    assert again.returncode == 2 and "exists" in again.stderr and "--force" in again.stderr
