"""Nothing outside a dataset or model directory is read: manifest and index entries that name `../`,
an absolute path or a link resolving elsewhere are refused (exit 5, naming the entry and the
directory) before the file is opened — while a Hugging Face cache snapshot, links into its repo's
blobs, still loads. Files hpcllm appends to are never written through a link."""

import hashlib
import json
import os
import re
import shutil
import threading

import h5py
import pytest

from hpcllm.data import load_tokenizer, open_dataset
from hpcllm.data.prompts import PromptDataset
from hpcllm.errors import DataError
from tests.data.tiny import cli, copy, make_prompts, make_tokens, manifest, write_manifest

DEEP_PASSWD = "../" * 16 + "etc/passwd"


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return make_tokens(tmp_path_factory.mktemp("contain"))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return make_prompts(tmp_path_factory.mktemp("contain-prompts"))


def point_outside(d, how, outside):
    """Make d's first train shard entry name `outside` (a valid copy of that shard): by ../, by an
    absolute path, or by a link in d."""
    man = manifest(d)
    entry = next(e for e in man["shards"] if e["split"] == "train")
    if how == "link":
        (d / entry["path"]).unlink()
        (d / entry["path"]).symlink_to(outside)
        return entry["path"]
    entry["path"] = os.path.relpath(outside, d) if how == "dotdot" else str(outside)
    write_manifest(d, man, rehash=False)
    return entry["path"]


@pytest.mark.parametrize("how", ["dotdot", "absolute", "link"])
def test_a_token_shard_outside_the_dataset_is_refused(tokens, tmp_path, how):
    d = copy(tokens, tmp_path / "ds")
    outside = tmp_path / "outside.h5"
    shutil.copy(tokens / "train-00000.h5", outside)  # a shard that would load: only where it is matters
    name = point_outside(d, how, outside)
    with pytest.raises(DataError, match=rf"shard '{name}' resolves to {outside}, which is not in {d}"):
        open_dataset(d)
    p = cli("data", "verify", d, subprocess_=how == "dotdot")  # once as its own process: exit status 5
    assert p.returncode == 5 and f"shard '{name}' resolves to {outside}" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_a_tokenizer_file_or_manifest_outside_the_dataset_is_refused(tokens, tmp_path):
    d = copy(tokens, tmp_path / "ds")
    man = manifest(d)
    man["tokenizer_file"] = DEEP_PASSWD
    write_manifest(d, man, rehash=False)
    with pytest.raises(DataError, match=rf"tokenizer_file '{DEEP_PASSWD}' resolves to /etc/passwd, which is not in"):
        load_tokenizer(d)
    # manifest.json itself: a link to another dataset's manifest is not this dataset's
    other = copy(tokens, tmp_path / "other")
    (d / "manifest.json").unlink()
    (d / "manifest.json").symlink_to(other / "manifest.json")
    with pytest.raises(DataError, match=rf"manifest 'manifest.json' resolves to {other}/manifest.json"):
        open_dataset(d)


def test_provenance_hashes_only_the_manifest_the_job_reads(prompts, tmp_path):
    from types import SimpleNamespace

    from hpcllm.jobs.infer import start_fields

    d = copy(prompts, tmp_path / "p")
    spec = SimpleNamespace(infer=SimpleNamespace(prompts=str(d), model="m", array_task=0, array_tasks=1))
    assert start_fields(spec)["dataset_manifest_sha256"] == hashlib.sha256(
        (d / "manifest.json").read_bytes()).hexdigest()
    secret = tmp_path / "secret"
    secret.write_text("not this dataset's\n")
    (d / "manifest.json").unlink()
    (d / "manifest.json").symlink_to(secret)  # was read and hashed into provenance.jsonl
    assert start_fields(spec)["dataset_manifest_sha256"] is None


def test_prompt_datasets_name_only_their_own_files(prompts, tmp_path):
    d = copy(prompts, tmp_path / "p")
    man = manifest(d)
    man["tokenizer_file"] = DEEP_PASSWD  # was read and hashed, then refused for its checksum
    write_manifest(d, man, rehash=False)
    with pytest.raises(DataError, match=rf"tokenizer_file '{DEEP_PASSWD}' resolves to /etc/passwd"):
        PromptDataset(d).load_tokenizer()
    p = cli("data", "verify", d)
    assert p.returncode == 5 and "resolves to /etc/passwd" in p.stderr and "sha256" not in p.stderr, p.stderr
    d = copy(prompts, tmp_path / "p2")
    man = manifest(d)
    shutil.copy(d / man["shards"][0]["path"], tmp_path / "x.h5")
    man["shards"][0]["path"] = "../x.h5"
    write_manifest(d, man, rehash=False)
    with pytest.raises(DataError, match=rf"shard '../x.h5' resolves to {tmp_path}/x.h5, which is not in {d}"):
        PromptDataset(d)


def store_tokens_elsewhere(path, how, outside):
    """Rewrite a token shard so that HDF5 itself reads /tokens from `outside`: an external link to a
    dataset there, external raw storage, or a virtual dataset mapping it."""
    with h5py.File(path, "r") as f:
        attrs, doc_offsets, tokens = dict(f.attrs), f["doc_offsets"][:], f["tokens"][:]
    path.unlink()
    if how == "external storage":
        outside.write_bytes(tokens.tobytes())
    else:
        with h5py.File(outside, "w") as f:
            f.create_dataset("tokens", data=tokens)
    with h5py.File(path, "w") as f:
        if how == "external link":
            f["tokens"] = h5py.ExternalLink(str(outside), "tokens")
        elif how == "external storage":
            f.create_dataset("tokens", shape=tokens.shape, dtype=tokens.dtype, external=[(str(outside), 0, tokens.nbytes)])
        else:
            layout = h5py.VirtualLayout(shape=tokens.shape, dtype=tokens.dtype)
            layout[:] = h5py.VirtualSource(str(outside), "tokens", shape=tokens.shape)
            f.create_virtual_dataset("tokens", layout)
        f.create_dataset("doc_offsets", data=doc_offsets)
        f.attrs.update(attrs)


@pytest.mark.parametrize("how", ["external link", "external storage", "virtual"])
def test_a_shard_whose_tokens_hdf5_reads_from_another_file_is_refused(tokens, tmp_path, how):
    d = copy(tokens, tmp_path / "ds")
    store_tokens_elsewhere(d / "train-00000.h5", how, tmp_path / "elsewhere.bin")
    write_manifest(d, manifest(d))
    msg = {"external link": "/tokens is a link to another file or object (ExternalLink): refused",
           "external storage": "/tokens is stored in other files (external storage): refused",
           "virtual": "/tokens is stored in other files (virtual storage): refused"}[how]
    with pytest.raises(DataError, match=re.escape(f"train-00000.h5: {msg}")):
        open_dataset(d)
    p = cli("data", "verify", d)
    assert p.returncode == 5 and msg in p.stderr, p.stderr


def test_inference_outputs_export_reads_only_its_own_shards(tmp_path):
    from hpcllm.infer.job import export_jsonl
    from hpcllm.infer.outputs import FORMAT, FORMAT_VERSION

    out = tmp_path / "run" / "outputs"
    out.mkdir(parents=True)
    secret = tmp_path / "secret"
    secret.write_text("not an output shard\n")
    (out / "out-00000.h5").symlink_to(secret)
    (out / "manifest.json").write_text(json.dumps({
        "format": FORMAT, "format_version": FORMAT_VERSION, "mode": "generate",
        "shards": [{"path": "out-00000.h5", "bytes": secret.stat().st_size, "n_records": 1,
                    "sha256": hashlib.sha256(secret.read_bytes()).hexdigest()}]}))
    with pytest.raises(DataError, match=rf"shard 'out-00000.h5' resolves to {secret}, which is not in {out}"):
        export_jsonl(tmp_path / "run", tmp_path / "x.jsonl")


# ------------------------------------------------------------------------------- model dirs


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny GPT as an HF directory: sharded safetensors + index, generation_config, a tokenizer."""
    from hpcllm.data.tokenizer import ByteTokenizer
    from hpcllm.model import ModelConfig, build_model, save_hf_model

    d = tmp_path_factory.mktemp("hfmodel") / "m"
    m = build_model(ModelConfig(size="custom", n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=258).resolve())
    save_hf_model(m.init_weights(0), d, max_shard_bytes=8000, eos_ids=[256])
    ByteTokenizer().save_hf(d)
    assert len(list(d.glob("model-*.safetensors"))) >= 2
    return d


def first_shard(d):
    index = json.loads((d / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))[0]


def rename_in_index(d, old, new):
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: (new if v == old else v) for k, v in index["weight_map"].items()}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("how", ["dotdot", "absolute", "passwd", "link"])
def test_weight_files_outside_the_model_directory_are_refused(model, tmp_path, how):
    from hpcllm.model import load_hf_model

    d = copy(model, tmp_path / "m")
    shard = first_shard(d)
    outside = tmp_path / "elsewhere" / "x.safetensors"
    outside.parent.mkdir()
    shutil.copy(d / shard, outside)  # weights that would load: only where they are matters
    if how == "link":
        (d / shard).unlink()
        (d / shard).symlink_to(outside)
        name = shard
    else:
        name = {"dotdot": "../elsewhere/x.safetensors", "absolute": str(outside), "passwd": DEEP_PASSWD}[how]
        rename_in_index(d, shard, name)
    real = "/etc/passwd" if how == "passwd" else str(outside)
    with pytest.raises(DataError, match=rf"model.safetensors.index.json: weight_map entry '{name}' resolves to {real}, "
                                        rf"which is not in {d}"):
        load_hf_model(d)


def test_tokenizer_files_of_a_model_directory_stay_inside_it(model, tmp_path):
    from hpcllm.data.tokenizer import load_tokenizer_file, tokenizer_identity_of

    for name in ("tokenizer.json", "tokenizer_config.json"):
        d = copy(model, tmp_path / name)
        shutil.move(d / name, tmp_path / f"outside-{name}")
        (d / name).symlink_to(tmp_path / f"outside-{name}")
        with pytest.raises(DataError, match=rf"'{name}' resolves to {tmp_path}/outside-{name}, which is not in {d}"):
            load_tokenizer_file(d)
        if name == "tokenizer.json":
            with pytest.raises(DataError, match=rf"'{name}' resolves to"):
                tokenizer_identity_of(d)


def hf_cache_snapshot(model, cache, repo="models--org--tiny"):
    """`model` laid out as huggingface_hub caches it: every file of the snapshot a link into
    ../../blobs/<name of its content>."""
    import hashlib

    snap = cache / repo / "snapshots" / "0123abcd"
    (cache / repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(model.iterdir()):
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, cache / repo / "blobs" / blob)
        (snap / f.name).symlink_to(f"../../blobs/{blob}")
    return snap


def test_a_hugging_face_cache_snapshot_still_loads(model, tmp_path):
    import torch

    from hpcllm.data.tokenizer import load_tokenizer_file, tokenizer_identity_of
    from hpcllm.model import load_hf_model

    snap = hf_cache_snapshot(model, tmp_path / "hub")
    got, _ = load_hf_model(snap)
    want, _ = load_hf_model(model)
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values()))
    assert load_tokenizer_file(snap).vocab_size == 258 and tokenizer_identity_of(snap)[0] == "byte-v1"
    # ... but a link out of its repo folder (into another repo's blobs) is not the snapshot's
    other = hf_cache_snapshot(model, tmp_path / "hub", repo="models--org--other")
    shard = first_shard(snap)
    (snap / shard).unlink()
    (snap / shard).symlink_to(os.readlink(other / shard).replace("../../blobs", "../../../models--org--other/blobs"))
    with pytest.raises(DataError, match=rf"weight_map entry '{shard}' resolves to .*models--org--other/blobs/.*, which "
                                        r"is not in .*snapshots/0123abcd \(nor in its Hugging Face cache repo "):
        load_hf_model(snap)


# ------------------------------------------------------------------------- appended files


def test_appended_run_files_are_never_written_through_a_link(tmp_path):
    from hpcllm.launch.jobs import record_submission
    from hpcllm.log import setup_logging
    from hpcllm.provenance import append
    from hpcllm.train.metrics import MetricsLog

    writers = {
        "provenance.jsonl": lambda run: append(run, {"event": "start"}),
        "metrics.jsonl": lambda run: MetricsLog(run, True).write({"step": 1}),
        "jobs.jsonl": lambda run: record_submission(run, "1", "train", "x", 1),
        "logs/rank0.log": lambda run: setup_logging(0, run),
    }
    try:
        for name, write in writers.items():
            run = tmp_path / name.replace("/", "_")
            run.mkdir()
            target = tmp_path / f"victim-{name.replace('/', '_')}"
            target.write_text("precious\n")
            (run / name).parent.mkdir(parents=True, exist_ok=True)
            (run / name).symlink_to(target)
            with pytest.raises(DataError, match=rf"{run / name}: a symbolic link"):
                write(run)
            assert target.read_text() == "precious\n"
    finally:
        setup_logging(0)


def test_the_watchdogs_report_is_never_written_through_a_link(tmp_path, monkeypatch, capsys):
    """logs/faults.jsonl (the in-job restart reads the hung ranks there): best effort — the rank's
    abort must follow whatever happens — so a link is said on stderr, and nothing is written through it."""
    from hpcllm.comm.watchdog import _report

    target = tmp_path / "victim"
    target.write_text("precious\n")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "faults.jsonl").symlink_to(target)
    monkeypatch.setenv("HPCLLM_FAULT_FILE", str(tmp_path / "logs" / "faults.jsonl"))
    _report(missing=[1], rank=0)
    assert target.read_text() == "precious\n"
    assert f"{tmp_path / 'logs' / 'faults.jsonl'}: a symbolic link" in capsys.readouterr().err
    (tmp_path / "logs" / "faults.jsonl").unlink()
    _report(missing=[1], rank=0)  # a regular file: written
    assert '"missing": [1]' in (tmp_path / "logs" / "faults.jsonl").read_text()


def test_a_fifo_in_place_of_an_appended_file_is_refused_without_blocking(tmp_path):
    from hpcllm.provenance import append

    os.mkfifo(tmp_path / "provenance.jsonl")
    result = []

    def write():
        try:
            append(tmp_path, {"event": "start"})
            result.append("written")
        except DataError as e:
            result.append(str(e))

    t = threading.Thread(target=write, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # blocked in open(): release it by opening the reading end
        fd = os.open(tmp_path / "provenance.jsonl", os.O_RDONLY | os.O_NONBLOCK)
        t.join(10)
        os.close(fd)
        pytest.fail("appending to a FIFO blocked")
    assert result and "not a regular file" in result[0], result
