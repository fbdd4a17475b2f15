"""Checkpoints: the format that training writes and inference, export and the demo read.

`run_dir/checkpoints/step_NNNNNNNN/` is a sharded checkpoint (hpcllm.checkpoint.sharded): every rank
writes its part of the model and optimizer state through torch.distributed.checkpoint, and a run
loads it on any number of ranks and in any sharding mode. Export and inference consolidate the
model from the parts (`read_model_tensors`). Checkpoints of the first wave (one model.safetensors
and a state.pt written by rank 0) are still read for export and inference, not resumed.

A checkpoint is written into `step_N.tmp/` and renamed as a whole: a directory without the `.tmp`
suffix is complete by construction; one that is not (damaged, or copied in part) is skipped for
the previous complete step with a warning. Only the last `keep` are kept. Nothing in a checkpoint
is unpickled beyond tensors and plain values (torch.load(weights_only=True), and DCP's index through
an allow-list; an index entry that is a pickled object rather than a tensor is refused, by every
reader, before anything is loaded).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from hpcllm.checkpoint.files import first_line as _first_line
from hpcllm.checkpoint.files import read_state_file, read_tensors
from hpcllm.checkpoint.layout import is_complete_sharded
from hpcllm.errors import CheckpointError

if TYPE_CHECKING:
    import torch

# torch is imported where a checkpoint is read or written, not here: finding checkpoints and telling
# whether they are complete (the batch script's last word, hpcllm.launch.finish) must not cost seconds

_NAME = re.compile(r"^step_(\d{8})$")

__all__ = ["CheckpointError", "is_complete", "latest_checkpoint", "list_checkpoints", "load_trained_model",
           "read_checkpoint_model", "save_checkpoint"]

log = logging.getLogger("hpcllm.checkpoint")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)), key=lambda p: p.name)


def is_legacy(ckpt: Path) -> bool:
    """A first-wave checkpoint: model.safetensors and state.pt, written by rank 0."""
    return (ckpt / "model.safetensors").is_file() and (ckpt / "state.pt").is_file()


def is_complete(ckpt: Path) -> bool:
    return is_complete_sharded(ckpt) or is_legacy(ckpt)


def latest_checkpoint(run_dir: str | Path, *, warn: bool = True) -> Path | None:
    """The newest complete checkpoint; newer incomplete ones are skipped with a warning."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        if is_complete(ckpt):
            return ckpt
        if warn:
            log.warning("%s is incomplete (no dcp/.metadata, state.pt or meta.json: damaged or copied in part); "
                        "using the previous complete checkpoint", ckpt)
    return None


def save_checkpoint(run_dir: str | Path, step: int, comm, state: dict, global_state: dict, meta: dict,
                    keep: int, *, background: bool = False):
    """A training checkpoint, written by every rank together (a collective): `state` is the sharding
    plan's state_dict() (model and optimizer, each rank its part), `global_state` what rank 0 keeps
    (step, loader position, ...). Returns its path once it is complete — or, with `background`, the
    hpcllm.checkpoint.sharded.BackgroundSave whose `finish()` makes it visible once written. Only the
    last `keep` complete checkpoints stay."""
    from hpcllm.checkpoint.sharded import save_sharded, start_background_save

    root = Path(run_dir) / "checkpoints"
    if comm.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"

    def prune() -> None:
        if comm.rank == 0:
            for old in list_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)

    if background:
        return start_background_save(final, comm, state, {**global_state, "step": step}, meta, then=prune)
    save_sharded(final, comm, state, {**global_state, "step": step}, meta)
    prune()
    return final


def read_state(file: Path) -> dict:
    """A checkpoint's state.pt (read_state_file), which must hold a step."""
    state = read_state_file(file)
    if "step" not in state:
        raise CheckpointError(f"{file}: not an hpcllm checkpoint state (no step)")
    return state


def read_meta(ckpt: Path) -> dict:
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
        meta["spec"]["model"], meta["spec"]["data"]  # noqa: B018 - the keys readers rely on
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt / 'meta.json'}: missing or unreadable ({_first_line(e)})") from None
    return meta


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
    from hpcllm.model import build_model_on_meta

    ckpt = find_checkpoint(path)
    meta = read_meta(ckpt)
    tensors = read_checkpoint_model(ckpt)
    cfg = model_config(ckpt, meta, tensors)
    model = build_model_on_meta(cfg)
    model = model.materialize("cpu")
    load_weights(ckpt / "model.safetensors" if is_legacy(ckpt) else ckpt / "dcp", model, tensors)
    return model, cfg, meta["spec"]["data"]["dataset"]


def trained_model_on_meta(path: str | Path):
    """(model on the meta device, ModelConfig, dataset path, checkpoint dir): what load_trained_model
    loads, built before any weight is read — for `stream_checkpoint`."""
    from hpcllm.model import build_model_on_meta

    ckpt = find_checkpoint(path)
    meta = read_meta(ckpt)
    shapes = {}
    if is_legacy(ckpt) and "model" not in meta:  # its vocabulary is read off the embedding's shape
        shapes = {name: _Shape(shape) for name, shape in _legacy_shapes(ckpt).items()}
    cfg = model_config(ckpt, meta, shapes)
    model = build_model_on_meta(cfg)
    return model, cfg, meta["spec"]["data"]["dataset"], ckpt


def stream_checkpoint(ckpt: Path, model: torch.nn.Module, put) -> None:
    """put(parameter name, whole tensor) for each tensor of the checkpoint's model, one read at a
    time; `model` (on the meta device is fine) gives the names and shapes they must have. A
    checkpoint that does not fit fails with one line, as in load_weights."""
    own = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    tied = _tied_names(model)
    where = ckpt / "model.safetensors" if is_legacy(ckpt) else ckpt / "dcp"
    seen = set()
    for name, t in _iter_checkpoint_tensors(ckpt):
        if name not in own:
            raise CheckpointError(f"{where}: does not match the model (unexpected {name!r}) — was model.* changed "
                                  "since it was written?")
        if tuple(t.shape) != own[name]:
            raise CheckpointError(f"{where}: tensor '{name}' is {tuple(t.shape)} in the checkpoint but {own[name]} in "
                                  "this model — was model.* (n_embd, n_layer, block_size, vocab) changed since it was "
                                  "written?")
        put(name, t)
        seen.add(name)
        del t  # one whole tensor alive at a time
    missing = [k for k in own if k not in seen and k not in tied]
    if missing:
        raise CheckpointError(f"{where}: does not match the model (missing {missing[:3]}) — was model.* changed "
                              "since it was written?")


def _tied_names(model) -> set[str]:
    """Names of a parameter an earlier name already has (the same Parameter object: a model on the
    meta device has no storage whose addresses hpcllm.model.hf.tied_names could compare)."""
    seen, tied = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    return tied


def _legacy_shapes(ckpt: Path) -> dict[str, tuple]:
    from safetensors import SafetensorError, safe_open

    file = ckpt / "model.safetensors"
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({_first_line(e)})") from None


def _iter_checkpoint_tensors(ckpt: Path):
    if not is_legacy(ckpt):
        from hpcllm.checkpoint.sharded import iter_model_tensors

        yield from iter_model_tensors(ckpt)
        return
    from safetensors import SafetensorError, safe_open

    from hpcllm.model.registry import get_family

    file = ckpt / "model.safetensors"
    meta = read_meta(ckpt)
    cfg = model_config(ckpt, meta, {n: _Shape(s) for n, s in _legacy_shapes(ckpt).items()})
    family = get_family(cfg.arch)
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                yield key, family.tensor_from_legacy(key, f.get_tensor(key), cfg)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({_first_line(e)})") from None


class _Shape:
    """Stands for a tensor where only its shape is read (model_config's embedding)."""

    def __init__(self, shape):
        self.shape = shape


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or a run dir's latest complete checkpoint."""
    path = Path(path)
    if is_complete(path):
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"{path}: no complete checkpoint (neither a checkpoint dir nor a run dir with "
                              "checkpoints/step_*)")
    return ckpt


def read_checkpoint_model(ckpt: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's whole model by parameter name, consolidated from every rank's part."""
    if is_legacy(ckpt):
        from hpcllm.model.registry import get_family

        tensors = read_tensors(ckpt / "model.safetensors")
        cfg = model_config(ckpt, read_meta(ckpt), tensors)
        family = get_family(cfg.arch)
        return {name: family.tensor_from_legacy(name, t, cfg) for name, t in tensors.items()}
    from hpcllm.checkpoint.sharded import read_model_tensors

    return read_model_tensors(ckpt)


def load_weights(file: Path, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` into `model`, or fail with one line naming the first tensor that does not fit
    (a checkpoint of another shape: model.* changed on an existing run_dir)."""
    import torch

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
