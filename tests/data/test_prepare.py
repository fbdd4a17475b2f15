"""prepare: same bytes from 1, 2 and 3 ranks; tokenizers round-trip; h5dump reads shards; bad input.

The one-rank prepares run in one Python process (`cli`, a CliSession: each would pay ~2 s of
imports, torch's included), except those of the 1-2-3-rank comparison and the full disk (its own
process limits), which are the real command line."""

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpcllm.data.tokenizer import ByteTokenizer, load_tokenizer_file, train_bpe
from tests.disk_util import small_disk  # noqa: F401 - a fixture
from tests.mpi_util import run_mpi

CORPUS = {
    "a.txt": "first document\n\nsecond document, after a blank line\n",
    "b.txt": "",  # empty document: skipped and counted
    "sub/c.py": "def f(x):\n    return x * 2\n" * 50,
    "sub/d.txt": "caf\u00e9 \u2014 unicode \U0001f600\n" * 30,
    "e.bin.txt": None,  # non-UTF-8 bytes (written below)
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for name, text in CORPUS.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            p.write_bytes(b"latin-1 \xe9t\xe9 \xff\xfe bytes\n" * 20)
        else:
            p.write_text(text)
    for i in range(40):
        (root / f"doc{i:02d}.txt").write_text(f"document number {i}\n" + "lorem ipsum " * (i * 7 + 3))
    return root


def spec(tmp_path, corpus, out, **data):
    d = {"inputs": [str(corpus)], "dataset": str(out), "shard_tokens": 997, "val_fraction": 0.2, **data}
    p = tmp_path / f"prep-{out.name}.yaml"
    p.write_text(json.dumps({"kind": "prepare", "name": "t", "run_dir": str(tmp_path / "run"), "data": d}))
    return p


def digest(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.iterdir()):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def prepare_cli(*args, n=1, timeout=120, cli=None):
    """`hpcllm prepare ARGS` on n ranks; on one through `cli` (a CliSession's run) when given."""
    if cli is not None:
        assert n == 1
        return cli("prepare", *args, timeout=timeout)
    if n == 1:
        return subprocess.run([sys.executable, "-m", "hpcllm.cli", "prepare", *args], capture_output=True, text=True,
                              timeout=timeout)
    return run_mpi(n, [sys.executable, "-m", "hpcllm.cli", "prepare", *args], timeout=timeout)


@pytest.mark.mpi
def test_identical_dataset_from_1_2_3_ranks(tmp_path, corpus):
    digests = {}
    for n in (1, 2, 3):
        out = tmp_path / f"ds{n}"
        p = prepare_cli(str(spec(tmp_path, corpus, out)), n=n)
        assert p.returncode == 0, p.stderr[-3000:]
        digests[n] = digest(out)
        summary = json.loads(p.stdout.strip().splitlines()[-1])
        assert summary["empty_documents"] == 1 and summary["shards"] > 3
    assert digests[1] == digests[2] == digests[3]
    man = json.loads((tmp_path / "ds1" / "manifest.json").read_text())
    assert man["splits"]["train"]["n_tokens"] > 0 and man["splits"]["val"]["n_tokens"] > 0
    assert not list((tmp_path / "ds3").glob("*.tmp")) and not list((tmp_path / "ds3").glob(".*.tmp"))


def test_token_stream_is_documents_plus_eos(tmp_path, corpus, cli):
    out = tmp_path / "ds"
    assert prepare_cli(str(spec(tmp_path, corpus, out, val_fraction=0.0)), cli=cli).returncode == 0
    man = json.loads((out / "manifest.json").read_text())
    stream, starts = [], []
    for e in man["shards"]:
        with h5py.File(out / e["path"]) as f:
            starts += (f["doc_offsets"][:] + len(stream)).tolist()
            assert f.attrs["token_offset"] == len(stream) and f["tokens"].dtype == np.uint16
            stream += f["tokens"][:].tolist()
    docs = [stream[a:b] for a, b in zip(starts, starts[1:] + [len(stream)])]
    tok = ByteTokenizer()
    assert all(d[-1] == tok.eos_id for d in docs)
    texts = {bytes(d[:-1]) for d in docs}
    # byte tokenizer is lossless, even for invalid UTF-8; blank-line splitting is off (doc_split=file)
    assert (corpus / "e.bin.txt").read_bytes() in texts
    assert (corpus / "a.txt").read_bytes() in texts
    assert len(docs) == man["splits"]["train"]["n_docs"] == len(list(corpus.rglob("*.*"))) - 1  # minus empty b.txt


def test_h5dump_and_h5ls_read_a_shard(tmp_path, corpus, cli):
    out = tmp_path / "ds"
    assert prepare_cli(str(spec(tmp_path, corpus, out)), cli=cli).returncode == 0
    shard = sorted(out.glob("train-*.h5"))[0]
    ls = subprocess.run(["h5ls", str(shard)], capture_output=True, text=True)
    assert ls.returncode == 0 and "tokens" in ls.stdout and "doc_offsets" in ls.stdout
    dump = subprocess.run(["h5dump", "-d", "/tokens", "-s", "0", "-c", "5", str(shard)], capture_output=True, text=True)
    assert dump.returncode == 0 and "H5T_STD_U16LE" in dump.stdout


def test_byte_and_bpe_round_trip(tmp_path, corpus):
    text = "caf\u00e9 \u2014 def f(x): return x  \U0001f600\n\n tabs\tand spaces"
    byte = load_tokenizer_file("byte")
    assert byte.decode(byte.encode(text)) == text
    files = [str(p) for p in corpus.rglob("*.txt")] + [str(p) for p in corpus.rglob("*.py")]
    bpe = train_bpe(files, 400, tmp_path / "tok.json")
    assert bpe.vocab_size <= 400 and bpe.identity.startswith("bpe:")
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text and len(ids) < len(text.encode())
    again = load_tokenizer_file(tmp_path / "tok.json")
    assert again.identity == bpe.identity and again.encode(text) == ids


def test_bpe_dataset_and_prompts(tmp_path, corpus, cli):
    files = [str(p) for p in corpus.rglob("doc*.txt")]
    train_bpe(files, 300, tmp_path / "tok.json")
    out = tmp_path / "bpe"
    assert prepare_cli(str(spec(tmp_path, corpus, out, tokenizer=str(tmp_path / "tok.json"))), cli=cli).returncode == 0
    from hpcllm.data import load_tokenizer, open_dataset

    ds = open_dataset(out)
    assert ds.tokenizer_id.startswith("bpe:") and load_tokenizer(out).identity == ds.tokenizer_id
    man = json.loads((out / "manifest.json").read_text())
    assert man["splits"]["train"]["n_docs"] + man["splits"]["val"]["n_docs"] > 40

    jl = tmp_path / "p.jsonl"
    jl.write_text("\n".join(json.dumps({"id": 10 + i, "q": f"prompt {i}", "c": " answer"}) for i in range(5)) + "\n")
    pout = tmp_path / "prompts"
    p = prepare_cli(str(spec(tmp_path, tmp_path / "p.jsonl", pout, output="prompts", text_field="q", id_field="id",
                             continuation_field="c", prompts_per_shard=2)), cli=cli)
    assert p.returncode == 0, p.stderr
    from hpcllm.data.prompts import open_prompt_dataset

    pd = open_prompt_dataset(pout)
    recs = [pd.shards[i].load() for i in range(3)]
    assert [i for r in recs for i in r.ids] == [10, 11, 12, 13, 14]
    assert recs[0].texts == [b"prompt 0", b"prompt 1"]
    assert bytes(recs[0].prompts[1]).decode() == "prompt 1" and bytes(recs[0].continuations[0]).decode() == " answer"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"inputs": ["/nonexistent/*.txt"]}, "'/nonexistent/*.txt' matches no file"),
        ({"inputs": []}, "data.inputs is empty"),
        ({"tokenizer": "/nope/tokenizer.json"}, "tokenizer '/nope/tokenizer.json' not found"),
    ],
)
def test_bad_prepare_inputs(tmp_path, corpus, cli, data, message):
    p = prepare_cli(str(spec(tmp_path, corpus, tmp_path / "x", **data)), cli=cli)
    assert p.returncode == 5 and message in p.stderr and "Traceback" not in p.stderr


def test_bad_jsonl_names_file_and_line(tmp_path, cli):
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"text": "ok"}\n{"text": broken}\n')
    p = prepare_cli(str(spec(tmp_path, jl, tmp_path / "x")), cli=cli)
    assert p.returncode == 5 and f"{jl}:2: not valid JSON" in p.stderr
    jl.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    p = prepare_cli(str(spec(tmp_path, jl, tmp_path / "x")), cli=cli)
    assert p.returncode == 5 and f"{jl}:2: field 'text' missing" in p.stderr


def test_crash_leaves_no_complete_looking_dataset_and_rerun_is_identical(tmp_path, corpus, cli):
    out = tmp_path / "ds"
    s = spec(tmp_path, corpus, out)
    assert prepare_cli(str(s), cli=cli).returncode == 0
    good = digest(out)
    # a crash midway: manifest gone (removed first by prepare), a half-written shard left as .tmp
    (out / "manifest.json").unlink()
    (out / "train-00001.h5.tmp").write_bytes(b"half")
    from hpcllm.data import open_dataset
    from hpcllm.errors import DataError

    with pytest.raises(DataError, match="manifest.json: missing .* unfinished prepare"):
        open_dataset(out)
    assert prepare_cli(str(s), cli=cli).returncode == 0
    assert digest(out) == good


def test_a_full_disk_is_one_line_not_a_crash(tmp_path, small_disk):
    """The tokens were staged through a memory map: on a full disk the store killed prepare with
    SIGBUS and no word. Now the space is checked first, and a write that fails still says which file."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"document {i} " * 30 + "\n" for i in range(2000)))  # 0.8 M byte tokens
    out = small_disk.path / "ds"
    s = spec(tmp_path, corpus, out, doc_split="line", shard_tokens=10**5)
    p = subprocess.run([sys.executable, "-m", "hpcllm.cli", "prepare", str(s)], capture_output=True, text=True,
                       timeout=120, preexec_fn=small_disk.preexec())
    assert p.returncode == 5 and "Traceback" not in p.stderr, p.stderr
    line = [ln for ln in p.stderr.splitlines() if "error" in ln]
    assert len(line) == 1 and line[0].endswith("free some space, or choose another data.dataset"), p.stderr
    if small_disk.how == "tmpfs":  # refused before writing: what it needs is known once tokenized
        # 0.8 M tokens of 2 bytes and 2,000 document starts of 8, staged and then sharded
        assert re.match(f"hpcllm prepare: error: {re.escape(str(out))}: the dataset needs about 3.[0-9] MiB free "
                        r"while it is written \(staged tokens, then shards\), and its filesystem has 1.0 MiB",
                        line[0]), p.stderr
    else:  # the file-size limit: the first staging file is too large
        assert line[0].startswith(f"hpcllm prepare: error: cannot write {out}/.train.tokens.tmp: File too large")
    assert sorted(q.name for q in out.iterdir()) == []  # no manifest, no shard, no staging file


def test_a_write_that_fails_names_the_file_and_leaves_no_shard(tmp_path, small_disk):
    from hpcllm.data.prepare import _reserve, _writing
    from hpcllm.data.shards import write_token_shard
    from hpcllm.errors import DataError

    small_disk.fill()
    staged = small_disk.path / ".train.tokens.tmp"
    with small_disk.limit(), pytest.raises(DataError, match=f"^cannot write {staged}: (No space left on device|"
                                                            "File too large): free some space"):
        with _writing(staged, (staged,)), open(staged, "wb") as fh:
            _reserve(fh, 2 << 20)
    assert not staged.exists()  # the staging file goes, or it would keep the disk full
    shard = small_disk.path / "train-00000.h5"
    with small_disk.limit(), pytest.raises(DataError, match=f"^cannot write {shard}: (No space left on device|File "
                                                            "too large): free some space, or choose another data.dataset$"):
        with _writing(shard):
            write_token_shard(shard, np.arange(600_000, dtype=np.uint16), np.zeros(1, dtype=np.int64), {})
    assert sorted(q.name for q in small_disk.path.iterdir()) == ["filler"] * (small_disk.how == "tmpfs")
