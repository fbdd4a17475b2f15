"""Finding input files and reading documents/records out of them.

Inputs are files, globs, directories (walked, filtered by include/exclude patterns) or `stdlib:`
(this Python's standard library sources — the embedded default corpus). The file list is sorted, so
every rank and every run sees the same documents in the same order.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from hpcllm.data.config import DataConfig
from hpcllm.errors import DataError


@dataclass(frozen=True)
class InputFile:
    path: str  # absolute
    key: str  # stable name used for the train/val hash: relative to its input root
    size: int


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _excluded(rel: str, patterns: list[str]) -> bool:
    parts = rel.split(os.sep)
    return any(fnmatch.fnmatch(rel, p) or any(fnmatch.fnmatch(part, p) for part in parts) for p in patterns)


def glob_base(pattern: str) -> str:
    """The directory a glob starts from: its leading components without wildcards. A file's key is
    its path relative to it, so `/usr/share/doc/*/copyright` gives `pkg/copyright` — files that
    share a name stay distinct documents (the train/val split hashes the key) — and a plain file
    or `dir/*.txt` gives the file name."""
    parts = Path(os.path.abspath(pattern)).parts
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return os.path.join(*fixed) if fixed else os.sep


def find_inputs(cfg: DataConfig) -> list[InputFile]:
    if not cfg.inputs:
        raise DataError("data.inputs is empty: nothing to prepare")
    found: dict[str, InputFile] = {}
    for spec in cfg.inputs:
        root = stdlib_dir() if spec.strip() == "stdlib:" else os.path.expanduser(os.path.expandvars(spec))
        if os.path.isdir(root):
            for dirpath, dirnames, filenames in os.walk(root):
                rel_dir = os.path.relpath(dirpath, root)
                dirnames[:] = sorted(d for d in dirnames if not _excluded(os.path.normpath(os.path.join(rel_dir, d)), cfg.exclude))
                for name in sorted(filenames):
                    rel = os.path.normpath(os.path.join(rel_dir, name))
                    if any(fnmatch.fnmatch(name, p) for p in cfg.include) and not _excluded(rel, cfg.exclude):
                        full = os.path.abspath(os.path.join(dirpath, name))
                        found[full] = InputFile(full, rel, os.path.getsize(full))
        else:
            matches = sorted(glob.glob(root, recursive=True))
            if not matches:
                raise DataError(f"data.inputs: '{spec}' matches no file")
            base = glob_base(root)
            for m in matches:
                if os.path.isfile(m) and not _excluded(os.path.basename(m), cfg.exclude):
                    full = os.path.abspath(m)
                    found[full] = InputFile(full, os.path.relpath(full, base), os.path.getsize(full))
    if not found:
        raise DataError(f"data.inputs {cfg.inputs}: no input files after include/exclude filtering")
    return sorted(found.values(), key=lambda f: f.path)


def is_jsonl(path: str, cfg: DataConfig) -> bool:
    if cfg.input_format != "auto":
        return cfg.input_format == "jsonl"
    return path.endswith((".jsonl", ".json", ".ndjson"))


_BLANK = re.compile(rb"\n[ \t\r]*\n")


def iter_documents(f: InputFile, cfg: DataConfig) -> Iterator[bytes | str]:
    """Documents of one file: raw bytes for text files (the byte tokenizer keeps them exactly),
    str for JSONL. Empty documents are yielded too; the caller counts and skips them."""
    if is_jsonl(f.path, cfg):
        for lineno, obj in iter_jsonl(f.path):
            text = obj.get(cfg.text_field)
            if not isinstance(text, str):
                raise DataError(f"{f.path}:{lineno}: field '{cfg.text_field}' missing or not a string")
            yield text
        return
    data = Path(f.path).read_bytes()
    if cfg.doc_split == "file":
        yield data
    elif cfg.doc_split == "blank_line":
        yield from (b.strip(b"\n") for b in _BLANK.split(data))
    else:
        yield from data.split(b"\n")


def iter_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj
