"""Tokenizers from a model directory: special tokens as tokenizer_config.json / generation_config.json
name them, any vocabulary size, and chat prompts rendered as transformers' `apply_chat_template`
renders them — against transformers' AutoTokenizer on the same files (built here; no download).

The chat-prompt prepares run in one Python process (`cli`, a CliSession: ~2 s of imports saved per
command); the large-vocabulary prepare and training are the real command line."""

import json
from pathlib import Path

import h5py
import pytest

from hpcllm.data.tokenizer import HFTokenizer, load_tokenizer_file
from hpcllm.errors import DataError
from tests.infer.helpers import prepare_prompts

transformers = pytest.importorskip("transformers")

# Llama 3's template as Meta ships it (BOS from the template, header tokens, trimmed content)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# ChatML as Qwen2.5 writes it (default system prompt, whitespace control, attribute access), with a
# namespace and raise_exception as Qwen3's template uses them
CHATML_TEMPLATE = """{%- set ns = namespace(users=0) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}{%- set ns.users = ns.users + 1 %}{%- endif %}
{%- endfor %}
{%- if ns.users == 0 %}{{- raise_exception('a conversation needs a user message') }}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def main():\n    return sum(range(10))\n",
    "Über die Brücke gehen – naïve café, 日本語のテキスト, emoji 🙂.",
    "Slurm schedules jobs; MPI ranks allreduce gradients.\n\n" * 2,
]
CHATS = [
    [{"role": "user", "content": "Hello there!"}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "  What is MPI?  "}],
    [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon a time."},
     {"role": "user", "content": "Über die Brücke? 🙂"}],
]


def make_tokenizer_dir(d: Path, style: str, *, eos_in_config: bool = True) -> Path:
    """A model directory's tokenizer files: 'llama3' (BOS added by the post-processor, eos
    <|end_of_text|>, generation eos [<|end_of_text|>, <|eot_id|>]) or 'chatml' (Qwen-like: no BOS,
    eos <|im_end|>, pad <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = {"llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                           "<|eot_id|>"],
                "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]}[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                            show_progress=False))
    if style == "llama3":
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", bos)])
        config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "chat_template": LLAMA3_TEMPLATE}
        generation = {"bos_token_id": bos, "eos_token_id": [tok.token_to_id("<|end_of_text|>"),
                                                            tok.token_to_id("<|eot_id|>")]}
    else:
        config = {"eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True}, "pad_token": "<|endoftext|>",
                  "bos_token": None, "chat_template": CHATML_TEMPLATE}
        generation = {"eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]}
    if not eos_in_config:
        del config["eos_token"]
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config}))
    (d / "generation_config.json").write_text(json.dumps(generation))
    return d


@pytest.fixture(scope="module", params=["llama3", "chatml"])
def tokdir(request, tmp_path_factory):
    return request.param, make_tokenizer_dir(tmp_path_factory.mktemp(request.param), request.param)


def hf_chat_ids(d: Path, messages) -> list[int]:
    out = transformers.AutoTokenizer.from_pretrained(d).apply_chat_template(messages, add_generation_prompt=True,
                                                                           tokenize=True)
    return list(out["input_ids"] if not isinstance(out, list) else out)


def test_special_tokens_come_from_the_model_files(tokdir, tmp_path):
    style, d = tokdir
    tok = load_tokenizer_file(d)  # the directory, as data.tokenizer names it
    hf = transformers.AutoTokenizer.from_pretrained(d)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == len(hf)
    assert tok.eos_id == hf.eos_token_id == hf.convert_tokens_to_ids(
        "<|end_of_text|>" if style == "llama3" else "<|im_end|>")
    assert tok.pad_id == (tok.eos_id if style == "llama3" else hf.convert_tokens_to_ids("<|endoftext|>"))
    for text in CORPUS:  # a document is framed as transformers frames a text: Llama's BOS, nothing for Qwen
        assert tok.encode_document(text) == hf(text)["input_ids"]
        assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
    # without an eos_token in tokenizer_config.json: generation_config.json's first eos id
    other = make_tokenizer_dir(tmp_path / "noeos", style, eos_in_config=False)
    gen = json.loads((other / "generation_config.json").read_text())["eos_token_id"]
    assert load_tokenizer_file(other).eos_id == gen[0]
    # a special token named in tokenizer_config.json that the vocabulary lacks is one line naming both
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "<|nope|>"}))
    with pytest.raises(DataError, match=r"tokenizer_config.json: eos_token '<\|nope\|>' is not in .*tokenizer.json"):
        load_tokenizer_file(other)


def test_chat_prompts_match_transformers_apply_chat_template(tokdir, tmp_path, cli):
    from hpcllm.data import open_prompt_dataset

    style, d = tokdir
    records = [{"id": i, "messages": m} for i, m in enumerate(CHATS)] + [{"id": 10, "prompt": CORPUS[2]}]
    p = prepare_prompts(tmp_path, records, per_shard=10, cli=cli, tokenizer=str(d))
    assert p.returncode == 0, p.stderr
    ds = open_prompt_dataset(tmp_path / "prompts")
    recs = ds.shards[0].load()
    hf = transformers.AutoTokenizer.from_pretrained(d)
    for rid, ids in zip(recs.ids, recs.prompts):
        want = hf_chat_ids(d, CHATS[rid]) if rid < 10 else hf(CORPUS[2])["input_ids"]
        assert ids == want, rid
    if style == "llama3":  # one BOS: the template's, not the template's and the post-processor's
        assert recs.prompts[0].count(hf.bos_token_id) == 1
    # the dataset's copy of the tokenizer keeps its special tokens and chat template
    tok = ds.load_tokenizer()
    assert tok.eos_id == load_tokenizer_file(d).eos_id and tok.chat_template == load_tokenizer_file(d).chat_template
    assert ds.eos_id == tok.eos_id


def test_chat_records_that_cannot_render_are_named(tmp_path, cli):
    d = make_tokenizer_dir(tmp_path / "tok", "chatml")
    cases = [
        ([{"id": 0, "messages": [{"role": "system", "content": "only a system prompt"}]}],
         "prompts.jsonl:1: the chat template refused this conversation: a conversation needs a user message"),
        ([{"id": 0, "prompt": "x"}, {"id": 1, "messages": "hello"}], "prompts.jsonl:2: 'messages' must be a non-empty list"),
        ([{"id": 0, "messages": [{"content": "no role"}]}], "prompts.jsonl:1: messages[0] must be an object with a 'role'"),
        ([{"id": 0, "prompt": "x", "messages": CHATS[0]}], "prompts.jsonl:1: both 'prompt' and 'messages': give one"),
    ]
    for records, message in cases:
        p = prepare_prompts(tmp_path, records, cli=cli, tokenizer=str(d))
        assert p.returncode == 5 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert not (tmp_path / "prompts" / "manifest.json").exists()
    p = prepare_prompts(tmp_path, [{"id": 0, "messages": CHATS[0]}], cli=cli)  # the byte tokenizer has no template
    assert p.returncode == 5 and "needs a tokenizer with a chat template" in p.stderr


def test_a_chat_template_cannot_escape_its_sandbox(tmp_path):
    from hpcllm.data.chat import render_chat

    for evil in ("{{ messages.__class__.__mro__[1].__subclasses__() }}",
                 "{% set ns = namespace() %}{% set ns.__class__ = 1 %}x",
                 "{{ dict.__call__.__globals__ }}",
                 "{{ cycler.__init__.__globals__.os.popen('id').read() }}"):
        with pytest.raises(DataError, match="rec:1"):
            render_chat(evil, CHATS[0], {}, "rec:1")
    # the syntax error of a template names its line
    with pytest.raises(DataError, match="chat_template line 2"):
        render_chat("ok\n{% for %}", CHATS[0], {}, "rec:1")


def test_vocabulary_above_65535_gives_uint32_shards_and_trains(tmp_path):
    """A tokenizer as large as Llama 3's (128k) or Qwen's (151k) in kind: ids above 65535 survive."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    n = 70_000
    tok = Tokenizer(models.WordLevel({**{f"w{i}": i for i in range(n)}, "[UNK]": n}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["</s>"])
    d = tmp_path / "big"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(" ".join(f"w{(i * 7919 + j * 104729) % n}" for j in range(40)) for i in range(60)))
    spec = tmp_path / "prep.yaml"
    spec.write_text(json.dumps({"kind": "prepare", "run_dir": str(tmp_path / "prep"),
                                "data": {"inputs": [str(docs)], "doc_split": "line", "tokenizer": str(d),
                                         "dataset": str(tmp_path / "ds"), "val_fraction": 0.0}}))
    from tests.infer.helpers import run_cli

    p = run_cli("prepare", spec)
    assert p.returncode == 0, p.stderr
    man = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert man["dtype"] == "uint32" and man["vocab_size"] == n + 2 and man["eos_id"] == n + 1  # </s> by name
    shard = tmp_path / "ds" / man["shards"][0]["path"]
    with h5py.File(shard) as f:
        tokens = f["tokens"][:]
    assert tokens.dtype.name == "uint32" and tokens.max() > 65535
    assert tokens[:41].tolist() == [(j * 104729) % n for j in range(40)] + [n + 1]
    train = tmp_path / "train.yaml"
    train.write_text(json.dumps({
        "kind": "train", "run_dir": str(tmp_path / "run"), "data": {"dataset": str(tmp_path / "ds")},
        "model": {"arch": "llama", "size": "custom", "n_layer": 1, "n_head": 2, "n_kv_head": 1, "n_embd": 32,
                  "ffn_dim": 64, "block_size": 32},
        "train": {"max_steps": 2, "batch_size": 2, "seq_len": 16, "eval_interval": 0, "log_interval": 1,
                  "progress": False}}))
    p = run_cli("train", train, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    from hpcllm.checkpoint import load_trained_model

    model, cfg, _ = load_trained_model(tmp_path / "run")
    assert cfg.vocab_size == n + 2 and model.lm_head.weight.shape[0] == n + 2
