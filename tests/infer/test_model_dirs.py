"""A model directory as users download it (config, sharded safetensors, generation_config, tokenizer
files) used end to end: prompts and training data tokenized by its own tokenizer, served and
continued-pretrained by the jobs — and data of another tokenizer refused at train and infer time.

The inputs and the refusals run in one Python process (`cli`, a CliSession: ~3 s of start-up per
command saved); the served and the trained runs are the real command line (`run_cli`)."""

import json

import pytest
import torch

from tests.data.test_hf_tokenizer import CHATS, CORPUS, make_tokenizer_dir
from tests.infer.helpers import infer_spec, outputs, prepare_prompts, run_cli
from tests.model.test_llama import make_hf

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cli):
    root = tmp_path_factory.mktemp("modeldir")
    model = root / "Llama-tiny"
    make_hf("llama", seed=2).save_pretrained(model, max_shard_size="100KB")
    make_tokenizer_dir(model, "llama3")  # ~400 tokens: fewer than the 512 embedding rows, as Llama ships
    records = [{"id": i, "messages": m} for i, m in enumerate(CHATS)] + \
              [{"id": 10 + i, "prompt": t} for i, t in enumerate(CORPUS)]
    for name, tokenizer in (("prompts", str(model)), ("byteprompts", "byte")):
        recs = records if tokenizer != "byte" else records[len(CHATS):]  # no chat template to render with
        p = prepare_prompts(root, recs, per_shard=4, name=name, cli=cli, tokenizer=tokenizer)
        assert p.returncode == 0, p.stderr
    (root / "corpus.txt").write_text("\n\n".join(CORPUS * 10))
    for name, tokenizer in (("data", str(model)), ("bytedata", "byte")):
        spec = root / f"prep-{name}.yaml"
        spec.write_text(json.dumps({"kind": "prepare", "run_dir": str(root / f"prep-{name}"), "data": {
            "inputs": [str(root / "corpus.txt")], "doc_split": "blank_line", "tokenizer": tokenizer,
            "dataset": str(root / name), "val_fraction": 0.0}}))
        p = cli("prepare", spec)
        assert p.returncode == 0, p.stderr
    return root, model


def test_inference_from_a_model_directory_matches_hf_and_stops_on_its_eos_ids(setup):
    root, model = setup
    spec = infer_spec(root, "gen", model=model, prompts=root / "prompts", temperature=0.0, max_new_tokens=10)
    p = run_cli("infer", spec)
    assert p.returncode == 0, p.stderr[-2000:]
    got = outputs(root / "gen")
    hf = transformers.AutoModelForCausalLM.from_pretrained(model).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model)
    eos = json.loads((model / "generation_config.json").read_text())["eos_token_id"]
    # the stop ids are the tokenizer's end-of-text and every eos id of generation_config.json
    fp = json.loads((root / "gen" / "outputs" / "manifest.json").read_text())["fingerprint"]
    assert set(eos) <= set(fp["stop_token_ids"])
    for rid, msgs in enumerate(CHATS):
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"]
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=eos)
        assert got[rid] == ref[0, len(ids):].tolist(), rid
    for i, text in enumerate(CORPUS):
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=eos)
        assert got[10 + i] == ref[0, len(ids):].tolist(), i


def test_prompts_of_another_tokenizer_are_refused_naming_both(setup, cli):
    root, model = setup
    p = cli("infer", infer_spec(root, "mismatch", model=model, prompts=root / "byteprompts"))
    assert p.returncode == 5 and "Traceback" not in p.stderr
    assert f"{root / 'byteprompts'} was tokenized with 'byte-v1', the model's {model / 'tokenizer.json'}" in p.stderr
    assert f"data.tokenizer: {model}" in p.stderr
    assert not (root / "mismatch" / "outputs" / "manifest.json").exists()
    # a model without tokenizer files whose embedding is smaller than the prompts' vocabulary
    small = root / "small"
    hf = make_hf("qwen2")
    hf.resize_token_embeddings(300)
    hf.save_pretrained(small)
    p = cli("infer", infer_spec(root, "vocab", model=small, prompts=root / "prompts"))
    assert p.returncode == 8 and "Traceback" not in p.stderr
    assert (f"vocabulary mismatch: {small}/config.json vocab_size=300, but the prompts' tokenizer "
            f"{root / 'prompts' / 'tokenizer.json'} has") in p.stderr


def train_spec(root, name, dataset, model, **train):
    spec = root / f"{name}.yaml"
    spec.write_text(json.dumps({
        "kind": "train", "run_dir": str(root / name), "data": {"dataset": str(root / dataset)},
        "model": {"init": str(model)},
        "train": {"max_steps": 2, "batch_size": 2, "seq_len": 32, "eval_interval": 0, "log_interval": 1,
                  "progress": False, "warmup_steps": 0, "weight_decay": 0.0, **train}}))
    return spec


def test_continued_pretraining_starts_from_the_directory_weights(setup):
    from hpcllm.checkpoint import load_trained_model
    from hpcllm.model import load_hf_model

    root, model = setup
    p = run_cli("train", train_spec(root, "cont", "data", model, lr=1e-12, min_lr=1e-12), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    trained, cfg, _ = load_trained_model(root / "cont")
    start, _ = load_hf_model(model)
    assert cfg.arch == "llama" and cfg.vocab_size == 512 and cfg.rope_scaling.get("type") == "llama3"
    for (name, a), (_, b) in zip(sorted(trained.state_dict().items()), sorted(start.state_dict().items())):
        assert (a - b).abs().max().item() < 1e-8, name


def test_training_data_of_another_tokenizer_is_refused(setup, cli):
    root, model = setup
    p = cli("train", train_spec(root, "bad", "bytedata", model), timeout=300)
    assert p.returncode == 5 and "Traceback" not in p.stderr
    assert f"tokenizer mismatch: {root / 'bytedata'} was tokenized with 'byte-v1'" in p.stderr
    assert not (root / "bad" / "checkpoints").exists() or not any((root / "bad" / "checkpoints").iterdir())
