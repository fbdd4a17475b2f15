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
    ds = f["text"]
    if ds.dtype.kind == "O":  # variable-length strings (older prompt datasets)
        texts = [t if isinstance(t, bytes) else str(t).encode("utf-8") for t in ds[:]]
        if len(texts) != n:
            raise DataError(f"{where}: {len(texts)} texts for {n} records")
        return texts
    if "text_offsets" not in f:
        raise DataError(f"{where}: /text without /text_offsets")
    data, offsets = ds[:].tobytes(), f["text_offsets"][:]
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


def check_shard(dataset: Path, entry: dict, man: dict, *, checksum: bool = False) -> list[str]:
    """Problems with one shard listed in the manifest (empty list: fine). Cheap unless checksum."""
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
            tok = f["tokens"]
            if tok.dtype != np.dtype(man["dtype"]):
                problems.append(f"{path}: tokens dtype {tok.dtype}, manifest says {man['dtype']}")
            if tok.shape[0] != entry["n_tokens"]:
                problems.append(f"{path}: {tok.shape[0]} tokens, manifest says {entry['n_tokens']}")
            if int(f.attrs.get("vocab_size", -1)) != man["vocab_size"]:
                problems.append(f"{path}: vocab_size {f.attrs.get('vocab_size')}, manifest says {man['vocab_size']}")
    except (OSError, KeyError) as e:
        problems.append(f"{path}: unreadable HDF5 shard ({e})")
    return problems
