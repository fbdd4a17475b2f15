"""Token data that checksums cannot vouch for (whoever made the dataset wrote the checksums too):
token ids outside the vocabulary, a split or shard whose declared size is not what its files hold,
a shard that declares more tokens than it stores. `hpcllm data verify` names each (exit 5); the
loader refuses them instead of reading past a shard, returning uninitialised memory as tokens,
allocating for tokens that are not there, or handing the model an id its embedding does not have."""

import h5py
import numpy as np
import pytest

from hpcllm.data import TokenLoader, open_dataset
from hpcllm.data.prompts import PromptDataset
from hpcllm.errors import DataError
from tests.data.tiny import cli, copy, make_prompts, make_tokens, manifest, write_manifest


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return make_tokens(tmp_path_factory.mktemp("integrity"))


def verify_fails(d, *expected):
    p = cli("data", "verify", d, timeout=60)
    assert p.returncode == 5, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    for text in expected:
        assert text in p.stderr, p.stderr


def every_batch(d, mode):
    ld = TokenLoader(d, seq_len=31, batch_size=2, mode=mode, prefetch=0)
    return [ld.next_batch() for _ in range(ld.steps_per_epoch)]


@pytest.mark.parametrize("bad_id", [258, 65535])
def test_token_ids_outside_the_vocabulary(tokens, tmp_path, bad_id):
    d = copy(tokens, tmp_path / "ds")
    with h5py.File(d / "train-00001.h5", "r+") as f:
        f["tokens"][7] = bad_id
    write_manifest(d, manifest(d))
    verify_fails(d, f"train-00001.h5: token id {bad_id} at position 7 is outside the vocabulary of 258 tokens")
    # the loader checks every window it reads (the model would index its embedding with it)
    for mode in ("sequential", "random"):
        with pytest.raises(DataError, match=rf"train-00001.h5: token id {bad_id} at position 7 is outside the vocabulary"):
            every_batch(d, mode)


def test_a_split_larger_than_its_shards_is_refused(tokens, tmp_path):
    d = copy(tokens, tmp_path / "ds")
    man = manifest(d)
    held = man["splits"]["train"]["n_tokens"]
    man["splits"]["train"]["n_tokens"] = held * 1000  # the loader read past the shards: uninitialised memory
    write_manifest(d, man)
    msg = f"manifest.json: split 'train' declares {held * 1000} tokens, its shards hold {held}"
    verify_fails(d, msg)
    with pytest.raises(DataError, match=msg):
        open_dataset(d)


def test_shards_must_tile_their_split(tokens, tmp_path):
    d = copy(tokens, tmp_path / "ds")
    man = manifest(d)
    train = [e for e in man["shards"] if e["split"] == "train"]
    train[1]["token_offset"] += 5  # a gap of 5 tokens nobody holds
    write_manifest(d, man)
    msg = f"split 'train': shard train-00001.h5 starts at token {train[1]['token_offset']}, the shards before it end at"
    verify_fails(d, msg)
    with pytest.raises(DataError, match=msg):
        open_dataset(d)


def test_a_shard_whose_attributes_disagree_is_refused(tokens, tmp_path):
    d = copy(tokens, tmp_path / "ds")
    with h5py.File(d / "val-00000.h5", "r+") as f:
        n = int(f.attrs["n_tokens"])
        f.attrs["n_tokens"] = n * 1000
    write_manifest(d, manifest(d))
    msg = f"val-00000.h5: attribute n_tokens is {n * 1000}, manifest says {n}"
    verify_fails(d, msg)
    with pytest.raises(DataError, match=msg):
        open_dataset(d)


def test_reads_never_go_past_the_split(tokens):
    ds = open_dataset(tokens)
    n = ds.num_tokens("val")
    assert len(ds.read("val", n - 10, 10)) == 10
    with pytest.raises(DataError, match=rf"tokens \[{n - 10}, {n + 10}\) of split 'val', which holds {n}"):
        ds.read("val", n - 10, 20)


def declare_huge(path, n, layout):
    """Rewrite a shard whose /tokens declares n tokens and stores none (a contiguous dataset never
    written, or a chunked one without chunks): the file stays a few KB."""
    with h5py.File(path, "r") as f:
        attrs, doc_offsets, dtype = dict(f.attrs), f["doc_offsets"][:], f["tokens"].dtype
    path.unlink()
    with h5py.File(path, "w") as f:
        f.create_dataset("tokens", shape=(n,), dtype=dtype, chunks=(1 << 16,) if layout == "chunked" else None)
        f.create_dataset("doc_offsets", data=doc_offsets)
        for k, v in {**attrs, "n_tokens": n}.items():
            f.attrs[k] = v


@pytest.mark.parametrize("layout", ["contiguous", "chunked"])
def test_a_shard_declaring_tokens_it_does_not_store_is_refused(tokens, tmp_path, layout):
    d = copy(tokens, tmp_path / "ds")
    man = manifest(d)
    last = [e for e in man["shards"] if e["split"] == "train"][-1]
    huge = 1 << 40  # 2 TiB of uint16: training died allocating its windows' order
    declare_huge(d / last["path"], huge, layout)
    man["splits"]["train"]["n_tokens"] += huge - last["n_tokens"]
    last["n_tokens"] = huge
    write_manifest(d, man)
    msg = f"{last['path']}: /tokens declares {huge} tokens ({huge * 2} bytes) but stores"
    verify_fails(d, msg)
    with pytest.raises(DataError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        open_dataset(d)


def test_a_prompt_shard_declaring_tokens_it_does_not_store_is_refused(tmp_path):
    d = make_prompts(tmp_path)
    man = manifest(d)
    path = d / man["shards"][0]["path"]
    with h5py.File(path, "r+") as f:
        del f["tokens"]
        f.create_dataset("tokens", shape=(1 << 26,), dtype=np.uint16)  # 128 MiB declared, nothing stored
    write_manifest(d, man)
    with pytest.raises(DataError, match=r"prompts-00000.h5: /tokens declares 67108864 tokens \(134217728 bytes\) but "
                                        "stores"):
        PromptDataset(d).shards[0].load()
