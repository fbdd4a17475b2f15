"""Prompt datasets: any bytes round-trip (NULs, invalid UTF-8), empty prompts are refused at prepare
time naming the record, and shards/tokenizer are checked against the manifest before use.

The commands run in one Python process (`cli`, a CliSession: each would pay ~2 s of imports, torch's
included), except a prepare and a `data verify` kept as the real command line."""

import hashlib
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from hpcllm.data.prompts import open_prompt_dataset
from hpcllm.errors import DataError

CLI = [sys.executable, "-m", "hpcllm.cli"]


def prepare(tmp_path, inputs, name="ds", cli=None, **data):
    """`hpcllm prepare` of `inputs` into tmp_path/name: through `cli` if given, else a process of its own."""
    d = {"inputs": [str(p) for p in inputs], "output": "prompts", "dataset": str(tmp_path / name),
         "prompts_per_shard": 2, **data}
    spec = tmp_path / f"prep-{name}.yaml"
    spec.write_text(json.dumps({"kind": "prepare", "run_dir": str(tmp_path / "run"), "data": d}))
    if cli is not None:
        return cli("prepare", spec)
    return subprocess.run([*CLI, "prepare", str(spec)], capture_output=True, text=True, timeout=120)


def all_records(path):
    ds = open_prompt_dataset(path)
    recs = [s.load() for s in ds.shards]
    return ([i for r in recs for i in r.ids], [p for r in recs for p in r.prompts], [t for r in recs for t in r.texts])


def test_nul_and_invalid_utf8_round_trip(tmp_path, cli):
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"text": "a\u0000b"}) + "\n" + json.dumps({"text": "caf\u00e9 \u0000"}) + "\n")
    raw = tmp_path / "lines.txt"
    raw.write_bytes(b"\xff\xfe\x00 latin-1 \xe9t\xe9\n\n   \nlast\n")
    p = prepare(tmp_path, [jl], "j", text_field="text")
    assert p.returncode == 0, p.stderr  # was: ValueError: VLEN strings do not support embedded NULLs
    ids, prompts, texts = all_records(tmp_path / "j")
    assert texts == [b"a\x00b", "caf\u00e9 \u0000".encode()] and prompts == [list(t) for t in texts]
    p = prepare(tmp_path, [raw], "t", cli=cli, doc_split="line")
    assert p.returncode == 0, p.stderr
    ids, prompts, texts = all_records(tmp_path / "t")
    # the byte tokenizer keeps a text file's bytes exactly; blank lines are not records
    assert texts == [b"\xff\xfe\x00 latin-1 \xe9t\xe9", b"last"] and prompts == [list(t) for t in texts]
    assert ids == [0, 1]
    assert cli("data", "verify", tmp_path / "t").returncode == 0


def test_empty_prompt_is_refused_at_prepare_time_naming_the_record(tmp_path, cli):
    jl = tmp_path / "e.jsonl"
    jl.write_text('{"id": 1, "prompt": "ok"}\n{"id": 7, "prompt": ""}\n')
    p = prepare(tmp_path, [jl], cli=cli, text_field="prompt", id_field="id")
    assert p.returncode == 5 and f"{jl}:2: record 7: empty prompt" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "ds" / "manifest.json").exists()
    jl.write_text('{"id": 1, "prompt": "ok", "c": " x"}\n{"id": 2, "prompt": "fine", "c": ""}\n')
    p = prepare(tmp_path, [jl], cli=cli, text_field="prompt", id_field="id", continuation_field="c")
    assert p.returncode == 5 and f"{jl}:2: record 2: empty continuation" in p.stderr


def test_empty_documents_of_text_files_are_not_records(tmp_path, cli):
    (tmp_path / "a.txt").write_text("first block\n\nsecond block\n\n")
    (tmp_path / "b.txt").write_text("")
    p = prepare(tmp_path, [tmp_path / "a.txt", tmp_path / "b.txt"], cli=cli, doc_split="blank_line")
    assert p.returncode == 0, p.stderr
    assert all_records(tmp_path / "ds")[2] == [b"first block", b"second block"]


def test_lone_surrogate_is_named(tmp_path, cli):
    jl = tmp_path / "s.jsonl"
    jl.write_text('{"text": "ok"}\n{"text": "bad \\ud800 escape"}\n')
    p = prepare(tmp_path, [jl], cli=cli)
    assert p.returncode == 5 and f"{jl}:2: field 'text' is not valid Unicode" in p.stderr


def test_shards_and_tokenizer_are_checked_against_the_manifest(tmp_path, cli):
    jl = tmp_path / "p.jsonl"
    jl.write_text("".join(json.dumps({"text": f"prompt {i}"}) + "\n" for i in range(5)))
    assert prepare(tmp_path, [jl], cli=cli).returncode == 0
    ds = tmp_path / "ds"
    shard = ds / "prompts-00001.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="prompts-00001.h5: sha256 differs from the manifest's"):
        open_prompt_dataset(ds).shards[1].load()
    (ds / "tokenizer.json").write_text('{"type": "hpcllm-byte", "version": 1} ')
    problems = open_prompt_dataset(ds).verify()
    assert len(problems) == 2 and "tokenizer.json: sha256 differs" in problems[0] and "prompts-00001.h5" in problems[1]
    v = subprocess.run([*CLI, "data", "verify", str(ds)], capture_output=True, text=True)  # the real command
    assert v.returncode == 5 and "2 problem(s)" in v.stderr


def test_datasets_with_text_as_variable_length_strings_still_load(tmp_path, cli):
    """Prompt datasets prepared before text was stored as bytes hold /text as HDF5 strings."""
    jl = tmp_path / "p.jsonl"
    jl.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("one", "caf\u00e9")))
    assert prepare(tmp_path, [jl], cli=cli).returncode == 0
    ds = tmp_path / "ds"
    shard = ds / "prompts-00000.h5"
    with h5py.File(shard, "a") as f:
        del f["text"], f["text_offsets"]
        f.create_dataset("text", data=["one", "caf\u00e9"], dtype=h5py.string_dtype("utf-8"))
    man = json.loads((ds / "manifest.json").read_text())
    man["shards"][0].update(bytes=shard.stat().st_size, sha256=hashlib.sha256(shard.read_bytes()).hexdigest())
    (ds / "manifest.json").write_text(json.dumps(man))
    rec = open_prompt_dataset(ds).shards[0].load()
    assert rec.texts == [b"one", "caf\u00e9".encode()] and rec.prompts[1] == list("caf\u00e9".encode())
    assert np.array_equal(rec.ids, [0, 1])
