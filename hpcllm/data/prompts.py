"""Reading prompt datasets (from `hpcllm prepare` with data.output=prompts) for inference jobs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from hpcllm.data.shards import read_manifest
from hpcllm.errors import DataError


@dataclass
class PromptRecords:
    ids: list[int]
    prompts: list[list[int]]
    texts: list[str] | None
    continuations: list[list[int]] | None


@dataclass
class PromptShard:
    path: Path
    index: int
    n_records: int
    sha256: str

    def load(self) -> PromptRecords:
        import h5py

        try:
            with h5py.File(self.path, "r") as f:
                flat, off, ids = f["tokens"][:], f["offsets"][:], f["ids"][:]
                texts = [t.decode("utf-8") if isinstance(t, bytes) else t for t in f["text"][:]] if "text" in f else None
                conts = None
                if "cont_tokens" in f:
                    cflat, coff = f["cont_tokens"][:], f["cont_offsets"][:]
                    conts = [cflat[coff[i] : coff[i + 1]].tolist() for i in range(len(coff) - 1)]
        except (OSError, KeyError) as e:
            raise DataError(f"{self.path}: unreadable prompt shard ({e})") from None
        if len(off) != len(ids) + 1 or len(ids) != self.n_records or (len(off) and off[-1] != len(flat)):
            raise DataError(f"{self.path}: inconsistent prompt shard ({len(ids)} ids, {len(off)} offsets, "
                            f"{len(flat)} tokens; manifest says {self.n_records} records)")
        prompts = [flat[off[i] : off[i + 1]].tolist() for i in range(len(ids))]
        return PromptRecords([int(i) for i in ids], prompts, texts, conts)


class PromptDataset:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = man = read_manifest(self.path)
        if man.get("kind") != "prompts":
            raise DataError(f"{self.path}: a '{man.get('kind')}' dataset, expected prompt shards "
                            "(prepare with data.output=prompts)")
        self.shards = []
        for e in man["shards"]:
            path = self.path / e["path"]
            if not path.is_file():
                raise DataError(f"{path}: prompt shard missing")
            if path.stat().st_size != e["bytes"]:
                raise DataError(f"{path}: size {path.stat().st_size} bytes, manifest says {e['bytes']} (truncated?)")
            self.shards.append(PromptShard(path, e["index"], e["n_records"], e["sha256"]))
        self.tokenizer_id, self.vocab_size, self.eos_id = man["tokenizer"], man["vocab_size"], man["eos_id"]

    def verify(self) -> list[str]:
        from hpcllm.data.shards import sha256_file

        return [f"{s.path}: sha256 mismatch (corrupt)" for s in self.shards if sha256_file(s.path) != s.sha256]


def open_prompt_dataset(path: str | Path) -> PromptDataset:
    return PromptDataset(path)


__all__ = ["PromptDataset", "PromptRecords", "PromptShard", "open_prompt_dataset"]
