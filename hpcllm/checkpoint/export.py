"""`hpcllm export RUN_DIR OUT_DIR`: a training run's latest checkpoint (or a checkpoint dir) as an HF
model directory — config.json, safetensors (sharded with an index above --max-shard-size),
generation_config.json, and the tokenizer of the run's dataset (tokenizer.json +
tokenizer_config.json) — that transformers' `from_pretrained` loads with the same logits.

The directory is assembled under OUT_DIR.tmp and renamed when complete; an existing OUT_DIR is
refused unless --force.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from hpcllm.atomic import atomic_dir
from hpcllm.errors import CheckpointError, ConfigError

log = logging.getLogger("hpcllm")


def write_tokenizer(dataset: str, out: Path) -> tuple[list[int], int | None]:
    """Copy the dataset's tokenizer as HF files into `out`; returns its eos ids ([] if none found)."""
    from hpcllm.data.shards import read_manifest
    from hpcllm.errors import DataError

    try:
        man = read_manifest(dataset)
    except DataError as e:
        log.warning("no tokenizer exported: %s", e)
        return [], None
    from hpcllm.data import load_tokenizer

    # tokenizer.json as the data was made with it (the byte tokenizer as an equivalent HF one), and its
    # special tokens and chat template as tokenizer_config.json
    tok = load_tokenizer(dataset)
    tok.save_hf(out)
    return [man["eos_id"]], tok.pad_id


def export(run_dir: str, out_dir: str, *, max_shard_bytes: int = 5 << 30, dtype: str = "auto",
           force: bool = False) -> Path:
    from hpcllm.checkpoint import latest_checkpoint, load_trained_model, read_meta
    from hpcllm.model import save_hf_model

    out = Path(out_dir)
    if out.exists() and not force:
        raise ConfigError(f"{out} exists: choose another OUT_DIR or pass --force to replace it")
    if dtype not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"--dtype must be auto, fp32 or bf16, got {dtype!r}")
    model, cfg, dataset = load_trained_model(run_dir)
    src = Path(run_dir)
    ckpt = src if (src / "model.safetensors").is_file() else latest_checkpoint(src)
    if ckpt is None:
        raise CheckpointError(f"{run_dir}: no checkpoint to export")
    step = read_meta(ckpt).get("step")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        eos, pad = write_tokenizer(dataset, tmp)
        save_hf_model(model, tmp, max_shard_bytes=max_shard_bytes, eos_ids=eos, pad_id=pad,
                      dtype={"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    log.info("exported %s (step %s, %s, %.1fM parameters) to %s", ckpt, step, cfg.arch, model.num_params(False) / 1e6, out)
    return out


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
    t = text.strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            try:
                return int(float(t[: -len(u)]) * units[u])
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise ConfigError(f"--max-shard-size: {text!r} is not a size (e.g. 5GB, 500MB, 100000)") from None
