"""Checkpoints: the format that training writes and inference, export and the demo read.

`run_dir/checkpoints/step_NNNNNNNN/` holds

  model.safetensors   the weights (safetensors: nothing executable in it)
  state.pt            optimizer state, loader position, RNG, step — tensors and plain values only,
                      loaded with torch.load(weights_only=True): no arbitrary unpickling, ever
  meta.json           step, time, world size, the resolved job spec (for humans and `hpcllm plot`)

A checkpoint is written into `step_N.tmp/` and renamed as a whole (hpcllm.atomic.atomic_dir): a
directory without the `.tmp` suffix is complete by construction. Only the last `keep` are kept.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import torch

from hpcllm.atomic import atomic_dir
from hpcllm.errors import CheckpointError

_NAME = re.compile(r"^step_(\d{8})$")

__all__ = ["CheckpointError", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "load_trained_model",
           "save_checkpoint"]


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
    with atomic_dir(final) as tmp:
        save_file(model_tensors(model), str(tmp / "model.safetensors"), metadata={"step": str(step)})
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, "time": time.time(), **meta}, indent=2, default=str))
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, or a one-line CheckpointError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        return load_file(str(file))
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({_first_line(e)})") from None


def read_state(file: Path) -> dict:
    """state.pt through the weights-only unpickler. A file that needs anything else (arbitrary
    classes, code) is refused as untrusted: loading it unsafely is never offered."""
    import pickle

    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{file}: not a trusted checkpoint (it holds objects other than tensors and plain "
                              "values, which hpcllm never unpickles); was it written by hpcllm?") from None
    except (OSError, RuntimeError, EOFError, ValueError, KeyError) as e:
        raise CheckpointError(f"{file}: unreadable checkpoint state ({_first_line(e)})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{file}: not an hpcllm checkpoint state (no step)")
    return state


def read_meta(ckpt: Path) -> dict:
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
        meta["spec"]["model"], meta["spec"]["data"]  # noqa: B018 - the keys readers rely on
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt / 'meta.json'}: missing or unreadable ({_first_line(e)})") from None
    return meta


def load_checkpoint(path: str | Path, model: torch.nn.Module) -> dict:
    """Load weights into `model` and return the state dict (optimizer, loader, rng, step)."""
    path = Path(path)
    tensors = read_tensors(path / "model.safetensors")
    state = read_state(path / "state.pt")
    load_weights(path / "model.safetensors", model, tensors)
    return state


def model_config(ckpt: Path, meta: dict, tensors: dict[str, torch.Tensor]):
    """The resolved ModelConfig a checkpoint was written with. Checkpoints record it (`model` in
    meta.json); those of the first wave (GPT-2 only) recorded the spec's section, whose vocabulary
    came from the dataset: it is read off the embedding."""
    from hpcllm.model import ModelConfig

    known = ModelConfig.__dataclass_fields__
    if "model" in meta:
        raw, vocab = meta["model"], None
    else:
        raw = {**meta["spec"]["model"], "arch": "gpt2"}
        raw.setdefault("norm_eps", raw.pop("layer_norm_eps", None))
        emb = tensors.get("transformer.wte.weight")
        vocab = emb.shape[0] if emb is not None else None
    try:
        return ModelConfig(**{k: v for k, v in raw.items() if k in known}).resolve(vocab)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{ckpt / 'meta.json'}: the model config does not resolve ({e})") from None


def load_trained_model(path: str | Path):
    """(model, ModelConfig, dataset path) from a run dir (its latest checkpoint) or a checkpoint dir."""
    from hpcllm.model import build_model

    path = Path(path)
    ckpt = path if (path / "model.safetensors").is_file() else latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"{path}: no checkpoint (neither a checkpoint dir nor a run dir with checkpoints/)")
    meta = read_meta(ckpt)
    tensors = read_tensors(ckpt / "model.safetensors")
    cfg = model_config(ckpt, meta, tensors)
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.materialize("cpu")
    load_weights(ckpt / "model.safetensors", model, tensors)
    return model, cfg, meta["spec"]["data"]["dataset"]


def load_weights(file: Path, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` into `model`, or fail with one line naming the first tensor that does not fit
    (a checkpoint of another shape: model.* changed on an existing run_dir)."""
    from hpcllm.model.hf import tied_names

    own = model.state_dict()
    tied = tied_names(model)  # e.g. lm_head.weight, stored once as the embedding
    missing = [k for k in own if k not in tensors and k not in tied]
    unexpected = [k for k in tensors if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{file}: does not match the model (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}) — was model.* changed since it was written?")
    for name, t in tensors.items():
        if t.shape != own[name].shape:
            raise CheckpointError(f"{file}: tensor '{name}' is {tuple(t.shape)} in the checkpoint but "
                                  f"{tuple(own[name].shape)} in this model — was model.* (n_embd, n_layer, "
                                  "block_size, vocab) changed since it was written? Use a new run_dir or "
                                  "train.resume=false")
    with torch.no_grad():
        for name, t in tensors.items():
            own[name].copy_(t)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
