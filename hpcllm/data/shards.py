"""The on-disk format (docs/data-format.md): HDF5 shards + manifest.json, written atomically.

Token shard `<split>-NNNNN.h5`:
  /tokens       1-D uint16 (vocab <= 65535) or uint32, contiguous and uncompressed, so readers can
                memory-map it at its file offset (h5py slicing is ~3x slower; compression ~50x)
  /doc_offsets  1-D int64: shard-local start of every document that starts in this shard
  attributes    format, format_version, split, shard_index, token_offset (global start of the shard
                in the split's stream), n_tokens, n_docs, dtype, vocab_size, eos_id, tokenizer
Prompt shard `prompts-NNNNN.h5`: /tokens + /offsets (n+1, int64) ragged prompts, /ids (int64 record
ids), optional /text + /text_offsets (each record's text as bytes, see write_texts), optional
/cont_tokens + /cont_offsets (continuations to score).

Every file is written to `<name>.tmp` and renamed when complete; `manifest.json` is written last, so
a dataset without a manifest is unfinished and one with a manifest lists only complete shards.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from hpcllm.atomic import atomic_path
from hpcllm.errors import DataError
from hpcllm.paths import inside

FORMAT = "hpcllm-dataset"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _h5file(path: Path, mode: str):
    import h5py

    # a fixed library-version range and no timestamps: identical inputs give identical bytes
    return h5py.File(path, mode, libver=("v110", "v110"), track_order=False)


def _dataset(f, name: str, data: np.ndarray) -> None:
    f.create_dataset(name, data=data, track_times=False)


def write_token_shard(path: Path, tokens: np.ndarray, doc_offsets: np.ndarray, attrs: dict[str, Any]) -> None:
    with atomic_path(path) as tmp, _h5file(tmp, "w") as f:
        _dataset(f, "tokens", tokens)
        _dataset(f, "doc_offsets", doc_offsets.astype(np.int64))
        for k, v in sorted({"format": FORMAT, "format_version": FORMAT_VERSION, **attrs}.items()):
            f.attrs[k] = v


def write_prompt_shard(path: Path, prompts: list[list[int]], ids: list[int], dtype: np.dtype, attrs: dict[str, Any],
                       texts: list[bytes] | None = None, continuations: list[list[int]] | None = None) -> None:
    with atomic_path(path) as tmp, _h5file(tmp, "w") as f:
        flat, offsets = ragged(prompts, dtype)
        _dataset(f, "tokens", flat)
        _dataset(f, "offsets", offsets)
        _dataset(f, "ids", np.asarray(ids, dtype=np.int64))
        if texts is not None:
            write_texts(f, texts)
        if continuations is not None:
            cflat, coff = ragged(continuations, dtype)
            _dataset(f, "cont_tokens", cflat)
            _dataset(f, "cont_offsets", coff)
        for k, v in sorted({"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "prompts", **attrs}.items()):
            f.attrs[k] = v


def ragged(seqs: list[list[int]], dtype) -> tuple[np.ndarray, np.ndarray]:
    """Flat values + offsets (n+1, int64) of a list of sequences."""
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in seqs])
    flat = np.fromiter((t for s in seqs for t in s), dtype=dtype, count=int(offsets[-1]))
    return flat, offsets


def ragged_ok(offsets: np.ndarray, n: int, total: int) -> bool:
    """offsets (n+1) start at 0, never decrease and end at `total`: slicing with them is safe."""
    return (len(offsets) == n + 1 and int(offsets[0]) == 0 and int(offsets[-1]) == total
            and bool(np.all(np.diff(offsets) >= 0)))


def write_texts(f, texts: list[bytes]) -> None:
    """Texts as bytes: /text (uint8, every record's bytes back to back, attribute encoding=utf-8) and
    /text_offsets (n+1, int64). Any byte sequence round-trips — NULs and invalid UTF-8 included —
    which HDF5 variable-length strings cannot hold (they refuse an embedded NUL)."""
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(t) for t in texts])
    f.create_dataset("text", data=np.frombuffer(b"".join(texts), dtype=np.uint8), track_times=False)
    f["text"].attrs["encoding"] = "utf-8"
    _dataset(f, "text_offsets", offsets)


def read_texts(f, n: int, where: Path) -> list[bytes] | None:
    """The texts of write_texts (None when the file has none). Datasets prepared before texts were
    stored as bytes hold /text as variable-length strings: those are read too."""
    if "text" not in f:
        return None
    ds = stored_dataset(f, "text", where)
    if ds.dtype.kind == "O":  # variable-length strings (older prompt datasets)
        if ds.shape != (n,):
            raise DataError(f"{where}: {ds.shape} texts for {n} records")
        return [t if isinstance(t, bytes) else str(t).encode("utf-8") for t in ds[:]]
    if "text_offsets" not in f:
        raise DataError(f"{where}: /text without /text_offsets")
    data, offsets = ds[:].tobytes(), stored_dataset(f, "text_offsets", where)[:]
    if ds.dtype != np.uint8 or not ragged_ok(offsets, n, len(data)):
        raise DataError(f"{where}: inconsistent /text_offsets ({len(offsets)} for {n} records, {len(data)} bytes)")
    return [data[offsets[i] : offsets[i + 1]] for i in range(n)]


def manifest_path(dataset: str | Path) -> Path:
    """The dataset's manifest.json, refused (DataError) when it is a link out of the dataset."""
    d = Path(dataset)
    return inside(d, MANIFEST, what=f"dataset {d}: manifest")


def member(dataset: str | Path, name, what: str) -> Path:
    """A file the manifest names (`what`: its key), checked to lie inside the dataset before use."""
    return inside(dataset, name, what=f"{Path(dataset) / MANIFEST}: {what}")


def read_manifest(dataset: str | Path) -> dict:
    d = Path(dataset)
    if not d.exists():
        raise DataError(f"dataset '{d}' not found (run `hpcllm prepare` first)")
    m = manifest_path(d)
    if not m.is_file():
        partial = sorted(p.name for p in d.glob("*.h5*"))
        hint = f" ({len(partial)} shard file(s) present: an unfinished prepare? rerun it)" if partial else ""
        raise DataError(f"{m}: missing — '{d}' is not a complete hpcllm dataset{hint}")
    try:
        man = json.loads(m.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{m}: corrupt manifest ({e})") from None
    if man.get("format") != FORMAT:
        raise DataError(f"{m}: not an hpcllm dataset manifest (format={man.get('format')!r})")
    if man.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{m}: format_version {man.get('format_version')} unsupported (this hpcllm reads {FORMAT_VERSION})")
    return man


def stored_dataset(f, name: str, where: Path, unit: str = "values"):
    """f[name], once it is known to be a dataset of this file that stores what it declares: not a
    link to another file, not external or virtual storage (HDF5 reading another file, which may be
    anywhere), and every byte of it present — an HDF5 dataset can declare 2^40 tokens in a file of a
    few KB (storage never written reads as zeros), and reading or sizing work by it is a denial of
    service."""
    import h5py

    link = f.get(name, getlink=True)
    if link is None:
        raise DataError(f"{where}: no /{name}")
    if not isinstance(link, h5py.HardLink):
        raise DataError(f"{where}: /{name} is a link to another file or object ({type(link).__name__}): refused")
    ds = f[name]
    if not isinstance(ds, h5py.Dataset):
        raise DataError(f"{where}: /{name} is not a dataset")
    if ds.is_virtual or ds.external:
        raise DataError(f"{where}: /{name} is stored in other files ({'virtual' if ds.is_virtual else 'external'} "
                        "storage): refused")
    nbytes = ds.size * ds.dtype.itemsize
    if nbytes == 0:
        return ds
    declared = f"/{name} declares {ds.size} {unit} ({nbytes} bytes)"
    if ds.chunks is None:
        offset, stored = ds.id.get_offset(), ds.id.get_storage_size()
        if offset is None or stored < nbytes or offset + nbytes > f.id.get_filesize():
            raise DataError(f"{where}: {declared} but stores {stored if offset is not None else 0} bytes "
                            f"in a file of {f.id.get_filesize()}")
    else:
        expected = int(np.prod([-(-n // c) for n, c in zip(ds.shape, ds.chunks)]))
        have = ds.id.get_num_chunks()
        if have < expected:
            raise DataError(f"{where}: {declared} but stores {have} of its {expected} chunks")
    return ds


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def check_token_manifest(dataset: Path, man: dict) -> list[str]:
    """Problems with a token manifest's own numbers (empty list: fine): the token type fits the
    vocabulary, every shard entry is well formed, each split's shards tile its stream from 0 with no
    gap or overlap, and each split's n_tokens is what its shards hold — the loader sizes its epochs
    by it and must never be sent past the last shard."""
    m = dataset / MANIFEST
    vocab, dtype, shards, splits = man.get("vocab_size"), man.get("dtype"), man.get("shards"), man.get("splits")
    if not _int(vocab) or vocab == 0:
        return [f"{m}: vocab_size {vocab!r} is not a positive integer"]
    if dtype not in ("uint16", "uint32"):
        return [f"{m}: dtype {dtype!r} is not a token type (uint16 or uint32)"]
    if vocab - 1 > np.iinfo(np.dtype(dtype)).max:
        return [f"{m}: vocab_size {vocab} does not fit dtype {dtype}"]
    problems = [f"{m}: {k} {man.get(k)!r} is outside the vocabulary of {vocab}" for k in ("eos_id", "pad_id")
                if not _int(man.get(k)) or man.get(k) >= vocab]
    if not isinstance(splits, dict) or not all(isinstance(v, dict) and _int(v.get("n_tokens")) for v in splits.values()):
        return problems + [f"{m}: corrupt manifest (splits must map each split to its n_tokens)"]
    keys = ("token_offset", "n_tokens", "bytes")
    if not isinstance(shards, list) or not all(
            isinstance(e, dict) and isinstance(e.get("path"), str) and e.get("split") in splits
            and all(_int(e.get(k)) for k in keys) and isinstance(e.get("sha256"), str) for e in shards):
        return problems + [f"{m}: corrupt manifest (a shard entry lacks path, a listed split, token_offset, n_tokens, "
                           "bytes or sha256)"]
    for split, info in splits.items():
        end = 0
        for e in sorted((e for e in shards if e["split"] == split), key=lambda e: e["token_offset"]):
            if e["token_offset"] != end:
                problems.append(f"{m}: split '{split}': shard {e['path']} starts at token {e['token_offset']}, the shards "
                                f"before it end at {end}")
            end = e["token_offset"] + e["n_tokens"]
        held = sum(e["n_tokens"] for e in shards if e["split"] == split)
        if info["n_tokens"] != held:
            problems.append(f"{m}: split '{split}' declares {info['n_tokens']} tokens, its shards hold {held}")
    return problems


SCAN_TOKENS = 1 << 24  # tokens per step of the vocabulary scan: 32-64 MiB of memory whatever the shard


def first_out_of_vocab(tokens, vocab_size: int, start: int = 0) -> tuple[int, int] | None:
    """(position, id) of the first token id >= vocab_size in tokens (an array or h5py dataset),
    read SCAN_TOKENS at a time; positions count from `start`. None: all in range."""
    for lo in range(0, len(tokens), SCAN_TOKENS):
        part = np.asarray(tokens[lo : lo + SCAN_TOKENS])
        if part.size and int(part.max()) >= vocab_size:
            i = int(np.argmax(part >= vocab_size))
            return start + lo + i, int(part[i])
    return None


def out_of_vocab(where: Path, position: int, token: int, vocab_size: int) -> str:
    return f"{where}: token id {token} at position {position} is outside the vocabulary of {vocab_size} tokens"


def check_shard(dataset: Path, entry: dict, man: dict, *, checksum: bool = False, scan: bool = False) -> list[str]:
    """Problems with one shard listed in a token manifest that check_token_manifest found well formed
    (empty list: fine). Cheap — the file's metadata only — unless checksum (every byte hashed) or
    scan (every token id compared with the vocabulary, a bounded chunk at a time)."""
    import h5py

    try:
        path = member(dataset, entry["path"], "shard")
    except DataError as e:
        return [str(e)]
    if not path.is_file():
        return [f"{path}: missing"]
    if path.stat().st_size != entry["bytes"]:
        return [f"{path}: size {path.stat().st_size} bytes, manifest says {entry['bytes']} (truncated or replaced?)"]
    problems = []
    if checksum and sha256_file(path) != entry["sha256"]:
        problems.append(f"{path}: sha256 mismatch (corrupt)")
    try:
        with h5py.File(path, "r") as f:
            tok = stored_dataset(f, "tokens", path, "tokens")
            if tok.ndim != 1:
                problems.append(f"{path}: /tokens has shape {tok.shape}, a token stream is 1-D")
            if tok.dtype != np.dtype(man["dtype"]):
                problems.append(f"{path}: tokens dtype {tok.dtype}, manifest says {man['dtype']}")
            if tok.shape[0] != entry["n_tokens"]:
                problems.append(f"{path}: {tok.shape[0]} tokens, manifest says {entry['n_tokens']}")
            if int(f.attrs.get("vocab_size", -1)) != man["vocab_size"]:
                problems.append(f"{path}: vocab_size {f.attrs.get('vocab_size')}, manifest says {man['vocab_size']}")
            for key, want in (("n_tokens", entry["n_tokens"]), ("token_offset", entry["token_offset"]),
                              ("split", entry["split"])):
                have = f.attrs.get(key)  # each shard describes itself too: the two must agree
                have = have.decode(errors="replace") if isinstance(have, bytes) else have
                if have is not None and str(have) != str(want):
                    problems.append(f"{path}: attribute {key} is {have}, manifest says {want}")
            if scan and tok.ndim == 1:
                bad = first_out_of_vocab(tok, man["vocab_size"])
                if bad is not None:
                    problems.append(out_of_vocab(path, *bad, man["vocab_size"]))
    except DataError as e:
        problems.append(str(e))
    except (OSError, KeyError, ValueError) as e:
        problems.append(f"{path}: unreadable HDF5 shard ({e})")
    return problems


def token_dataset_problems(dataset: str | Path, man: dict, *, checksum: bool = False, scan: bool = False) -> list[str]:
    """Everything wrong with a token dataset (empty list: fine): its manifest's numbers, then every
    shard. What a training job checks at open (cheap); `hpcllm data verify` adds checksum and scan."""
    d = Path(dataset)
    problems = check_token_manifest(d, man)
    if problems:
        return problems
    return [p for e in man["shards"] for p in check_shard(d, e, man, checksum=checksum, scan=scan)]


def open_token_manifest(dataset: str | Path, *, checksum: bool = False) -> dict:
    """A token dataset's manifest, once the checks a training job makes at open pass (the manifest's
    numbers, every shard's metadata): what hpcllm.data.Dataset opens, and all `hpcllm plan` reads."""
    man = read_manifest(dataset)
    if man.get("kind") != "tokens":
        raise DataError(f"{Path(dataset)}: a '{man.get('kind')}' dataset, expected token shards (for training)")
    problems = token_dataset_problems(dataset, man, checksum=checksum)
    if problems:
        raise DataError("bad dataset:\n  " + "\n  ".join(problems))
    return man
