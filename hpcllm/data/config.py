"""The `data` section of a job spec: what `prepare` reads and writes, and what train/infer read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hpcllm.fields import path_field


@dataclass
class DataConfig:
    # dataset directory (manifest.json + shards): written by `prepare`, read by train and infer
    dataset: str = path_field("")
    # --- prepare --------------------------------------------------------------------------
    # files, globs or directories; "stdlib:" means this Python's standard library sources
    inputs: list[str] = field(default_factory=list)
    input_format: Literal["auto", "text", "jsonl"] = "auto"  # auto: by extension (.jsonl/.json -> jsonl)
    text_field: str = "text"  # JSONL field holding the document / prompt
    messages_field: str = "messages"  # JSONL field with a chat (prompts): rendered with the tokenizer's chat_template
    id_field: str = ""  # JSONL field with a stable record id (prompts); "" = line number
    continuation_field: str = ""  # JSONL field with a continuation to score (prompts, optional)
    doc_split: Literal["file", "blank_line", "line"] = "file"  # how a text file splits into documents
    include: list[str] = field(default_factory=lambda: ["*"])  # name patterns when walking directories
    exclude: list[str] = field(default_factory=list)  # path patterns (fnmatch) to skip when walking
    tokenizer: str = "byte"  # "byte", a model directory (its tokenizer.json + tokenizer_config.json), a tokenizer.json
    output: Literal["tokens", "prompts"] = "tokens"
    val_fraction: float = 0.05  # share of documents (by seeded hash) in the val split
    split_seed: int = 0
    shard_tokens: int = 50_000_000  # tokens per shard (the last one holds the rest)
    keep_text: bool = True  # prompts: store the original text beside the tokens
    prompts_per_shard: int = 1024  # prompts: records per shard (a shard is a unit of inference work)

    def validate(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.prompts_per_shard < 1:
            raise ValueError(f"prompts_per_shard must be >= 1, got {self.prompts_per_shard}")
        if self.shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {self.shard_tokens}")
