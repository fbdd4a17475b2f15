"""Atomic checkpoints: `run_dir/checkpoints/step_NNNNNNNN/` holds

  model.safetensors   the weights (safetensors: nothing executable in it)
  state.pt            optimizer state, loader position, RNG, step — tensors and plain values only,
                      loaded with torch.load(weights_only=True): no arbitrary unpickling
  meta.json           step, time, the resolved job spec (for humans and `hpcllm plot`)

A checkpoint is written into `step_N.tmp/`, every file fsynced, then renamed: a directory without
the `.tmp` suffix is complete by construction. Only the last `keep` are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch

from hpcllm.errors import HpcllmError

_NAME = re.compile(r"^step_(\d{8})$")


class CheckpointError(HpcllmError):
    exit_code = 6


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)), key=lambda p: p.name)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates (safetensors refuses shared storage)."""
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out[name] = t.detach().to("cpu").contiguous()
    return out


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, state: dict, meta: dict,
                    keep: int) -> Path:
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(model_tensors(model), str(tmp / "model.safetensors"), metadata={"step": str(step)})
    torch.save(state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, "time": time.time(), **meta}, indent=2, default=str))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():  # a rerun reached the same step again: replace it
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module) -> dict:
    """Load weights into `model` and return the state dict (optimizer, loader, rng, step)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        tensors = load_file(str(path / "model.safetensors"))
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except (OSError, SafetensorError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({e})") from None
    load_checkpoint_weights(path, model, tensors)
    return state


def load_trained_model(path: str | Path):
    """(model, ModelConfig, dataset path) from a run dir (its latest checkpoint) or a checkpoint dir."""
    from hpcllm.model import GPT, ModelConfig

    path = Path(path)
    ckpt = path if (path / "model.safetensors").is_file() else latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"{path}: no checkpoint (neither a checkpoint dir nor a run dir with checkpoints/)")
    meta = json.loads((ckpt / "meta.json").read_text())
    spec_model = meta["spec"]["model"]
    cfg = ModelConfig(**{k: v for k, v in spec_model.items() if k in ModelConfig.__dataclass_fields__})
    from safetensors.torch import load_file

    tensors = load_file(str(ckpt / "model.safetensors"))
    cfg = cfg.resolve(tensors["transformer.wte.weight"].shape[0])
    model = GPT(cfg)
    load_checkpoint_weights(ckpt, model, tensors)
    return model, cfg, meta["spec"]["data"]["dataset"]


def load_checkpoint_weights(ckpt: Path, model: torch.nn.Module, tensors: dict | None = None) -> None:
    from safetensors.torch import load_file

    tensors = tensors if tensors is not None else load_file(str(ckpt / "model.safetensors"))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}/model.safetensors: does not match the model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]}) — was model.* changed?")
