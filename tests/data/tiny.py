"""Tiny real datasets prepared in this process (byte tokenizer, no subprocess: a fraction of a second),
and the helpers the integrity tests use to damage them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from hpcllm.data.shards import MANIFEST, sha256_file

CLI = [sys.executable, "-m", "hpcllm.cli"]


def _single():
    import torch

    from hpcllm.comm.communicator import SingleProcess
    from hpcllm.comm.world import detect_world

    return SingleProcess(detect_world({}), torch.device("cpu"), 10.0)


def make_tokens(root: Path, shard_tokens: int = 4000) -> Path:
    """A token dataset of ~12 KB of text: several train shards, one val shard."""
    from hpcllm.data.config import DataConfig
    from hpcllm.data.prepare import prepare

    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        (corpus / f"{i}.txt").write_bytes(bytes(rng.integers(32, 127, 1200 + 50 * i, dtype=np.uint8)))
    prepare(DataConfig(inputs=[str(corpus)], dataset=str(root / "ds"), shard_tokens=shard_tokens, val_fraction=0.25),
            _single())
    return root / "ds"


def make_prompts(root: Path) -> Path:
    from hpcllm.data.config import DataConfig
    from hpcllm.data.prepare import prepare

    (root / "p.jsonl").write_text("".join(json.dumps({"text": f"prompt {i}"}) + "\n" for i in range(5)))
    prepare(DataConfig(inputs=[str(root / "p.jsonl")], dataset=str(root / "prompts"), output="prompts",
                       prompts_per_shard=2), _single())
    return root / "prompts"


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def manifest(d: Path) -> dict:
    return json.loads((d / MANIFEST).read_text())


def write_manifest(d: Path, man: dict, *, rehash: bool = True) -> None:
    """Write the manifest back, with every listed shard's bytes and sha256 recomputed (rehash): the
    damage is then invisible to checksums, as when whoever made the dataset made it so."""
    if rehash:
        for e in man["shards"]:
            p = d / e["path"]
            if p.is_file():
                e["bytes"], e["sha256"] = p.stat().st_size, sha256_file(p)
    (d / MANIFEST).write_text(json.dumps(man))


def cli(*args, timeout=120, subprocess_: bool = False) -> subprocess.CompletedProcess:
    """`hpcllm ARGS`: in this process through the CLI's own main() (exit code, stderr) — a second
    a command saved — or, with subprocess_, as its own process."""
    if subprocess_:
        return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    import contextlib
    import io

    from hpcllm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
