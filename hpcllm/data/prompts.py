"""Reading prompt datasets (from `hpcllm prepare` with data.output=prompts) for inference jobs.

A shard is checked against the manifest before anything in it is used: its bytes are read once,
their sha256 compared with the manifest's, and HDF5 then opens that verified copy in memory. A
corrupt shard is named (exit 5) instead of giving an IndexError, silently different outputs, or a
reader stuck in a damaged file; `hpcllm data verify` runs exactly the same checks.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpcllm.data.shards import MANIFEST, member, ragged_ok, read_manifest, read_texts, stored_dataset
from hpcllm.errors import DataError


@dataclass
class PromptRecords:
    ids: list[int]
    prompts: list[list[int]]
    texts: list[bytes] | None  # the prompt text as bytes (utf-8 unless it came from a non-UTF-8 file)
    continuations: list[list[int]] | None


def read_verified(path: Path, n_bytes: int | None, sha256: str) -> bytes:
    """The bytes of a file the manifest describes (size, when recorded, and sha256), or a DataError
    naming it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except OSError as e:
        raise DataError(f"{path}: unreadable ({e.strerror or e})") from None
    if n_bytes is not None and len(data) != n_bytes:
        raise DataError(f"{path}: size {len(data)} bytes, manifest says {n_bytes} (truncated or replaced?)")
    if hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(f"{path}: sha256 differs from the manifest's (corrupt)")
    return data


@dataclass
class PromptShard:
    path: Path
    index: int
    n_records: int
    n_bytes: int
    sha256: str
    vocab_size: int

    def load(self) -> PromptRecords:
        import h5py

        data = read_verified(self.path, self.n_bytes, self.sha256)
        try:
            with h5py.File(io.BytesIO(data), "r") as f:
                # each dataset stores what it declares before it is read: sizes come from the file
                flat, off, ids = (stored_dataset(f, k, self.path, "tokens" if k == "tokens" else "values")[:]
                                  for k in ("tokens", "offsets", "ids"))
                texts = read_texts(f, len(ids), self.path)
                cflat = coff = None
                if "cont_tokens" in f:
                    cflat, coff = stored_dataset(f, "cont_tokens", self.path, "tokens")[:], \
                        stored_dataset(f, "cont_offsets", self.path)[:]
        except (OSError, KeyError, ValueError) as e:
            raise DataError(f"{self.path}: unreadable prompt shard ({e})") from None
        if len(ids) != self.n_records or not ragged_ok(off, len(ids), len(flat)):
            raise DataError(f"{self.path}: inconsistent prompt shard ({len(ids)} ids, {len(off)} offsets, "
                            f"{len(flat)} tokens; manifest says {self.n_records} records)")
        if len(flat) and int(flat.max()) >= self.vocab_size:
            raise DataError(f"{self.path}: token id {int(flat.max())} outside the vocabulary of {self.vocab_size}")
        conts = None
        if cflat is not None:
            if not ragged_ok(coff, len(ids), len(cflat)):
                raise DataError(f"{self.path}: inconsistent /cont_offsets")
            conts = [cflat[coff[i] : coff[i + 1]].tolist() for i in range(len(ids))]
        prompts = [flat[off[i] : off[i + 1]].tolist() for i in range(len(ids))]
        return PromptRecords([int(i) for i in np.asarray(ids)], prompts, texts, conts)


class PromptDataset:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = man = read_manifest(self.path)
        if man.get("kind") != "prompts":
            raise DataError(f"{self.path}: a '{man.get('kind')}' dataset, expected prompt shards "
                            "(prepare with data.output=prompts)")
        try:
            self.tokenizer_id, self.vocab_size, self.eos_id = man["tokenizer"], int(man["vocab_size"]), man["eos_id"]
            self.tokenizer_file, self.tokenizer_sha256 = man["tokenizer_file"], man["tokenizer_sha256"]
            entries = [(e["path"], int(e["index"]), int(e["n_records"]), int(e["bytes"]), str(e["sha256"]))
                       for e in man["shards"]]
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{self.path / MANIFEST}: corrupt manifest (missing or bad {e})") from None
        self.shards = [PromptShard(member(self.path, name, "shard"), *rest, self.vocab_size) for name, *rest in entries]

    def check_files(self) -> None:
        """Every shard is present with its recorded size (cheap: fails a job before any work)."""
        for s in self.shards:
            if not s.path.is_file():
                raise DataError(f"{s.path}: missing")
            if s.path.stat().st_size != s.n_bytes:
                raise DataError(f"{s.path}: size {s.path.stat().st_size} bytes, manifest says {s.n_bytes} "
                                "(truncated or replaced?)")

    def load_tokenizer(self):
        """The tokenizer beside the shards, checked against the manifest's checksum and identity."""
        from hpcllm.data.tokenizer import load_tokenizer_file

        path = member(self.path, self.tokenizer_file, "tokenizer_file")
        read_verified(path, None, self.tokenizer_sha256)
        tok = load_tokenizer_file(path)
        if tok.identity != self.tokenizer_id or tok.vocab_size != self.vocab_size:
            raise DataError(f"{path}: tokenizer '{tok.identity}' of {tok.vocab_size} tokens, manifest says "
                            f"'{self.tokenizer_id}' of {self.vocab_size}")
        return tok

    def verify(self) -> list[str]:
        """Every problem an inference job would meet reading this dataset (empty: fine)."""
        problems = []
        try:
            self.load_tokenizer()
        except DataError as e:
            problems.append(str(e))
        for s in self.shards:
            try:
                s.load()
            except DataError as e:
                problems.append(str(e))
        return problems


def open_prompt_dataset(path: str | Path) -> PromptDataset:
    return PromptDataset(path)


__all__ = ["PromptDataset", "PromptRecords", "PromptShard", "open_prompt_dataset", "read_verified"]
