"""HF model directories in and out — safetensors only, nothing unpickled.

A directory as users download it: `config.json` (its `model_type` picks the family; transformers
4.x and 5.x layouts both read), `model.safetensors` or sharded `model-0000k-of-0000n.safetensors`
with `model.safetensors.index.json`, optionally `generation_config.json` and tokenizer files.

Loading streams: the model is built on the meta device in the dtype asked for, then each tensor is
read from its file and copied into place one at a time — no second full copy, bf16 stays bf16. A
model sharded for training (FSDP2, tensor parallel) keeps only each rank's part of each tensor
(`stream_hf_weights` with hpcllm.parallel.materialize).
Whatever does not fit (a missing shard, an unknown tensor, a wrong shape, a field the family does
not implement) is a one-line WeightsError naming the file and the field or tensor. Every file is
read only once it is known to lie inside the directory (hpcllm.paths.model_file: an index entry
`../x` or `/abs/x`, or a link out of the directory, is refused; a Hugging Face cache snapshot's
links into its repo's blobs are not "out").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hpcllm.atomic import atomic_path, write_json
from hpcllm.model.base import CausalLM, meta_device
from hpcllm.model.config import ModelConfig
from hpcllm.model.hf_config import WeightsError, model_dir, read_config  # torch-free: `hpcllm plan` reads these
from hpcllm.paths import model_file

INDEX = "model.safetensors.index.json"


def weight_files(d: Path) -> list[Path]:
    """The safetensors files of a directory: the index's shards (all must be there) or the one file."""
    index = model_file(d, INDEX)
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError, TypeError) as e:
            raise WeightsError(f"{index}: not a safetensors index ({e})") from None
        # every entry checked before any is opened: an index names files, and only files in here
        files = [model_file(d, n, what=f"{index}: weight_map entry") for n in names]
        missing = [n for n, f in zip(names, files) if not f.is_file()]
        if missing:
            raise WeightsError(f"{index}: names {missing[0]}, which is missing from {d}")
        return files
    single = model_file(d, "model.safetensors")
    if single.is_file():
        return [single]
    if any(d.glob("*.bin")) or any(d.glob("*.pt")):
        raise WeightsError(f"{d}: only pickled weights (*.bin/*.pt), which hpcllm never loads: convert them to "
                           "safetensors (transformers: save_pretrained(..., safe_serialization=True))")
    raise WeightsError(f"{d}: no model.safetensors and no {INDEX}")


def load_hf_model(path: str | Path, *, dtype: torch.dtype = torch.float32, device="cpu",
                  dropout: float = 0.0) -> tuple[CausalLM, ModelConfig]:
    """The model of an HF directory (or a safetensors file beside its config.json); `dropout` is
    the training's (HF configs describe inference)."""
    model, cfg = hf_model_on_meta(path, dropout=dropout)
    model = model.to(dtype).materialize(device)
    own = dict(model.named_parameters(remove_duplicate=False))

    def put(name: str, t: torch.Tensor) -> None:
        with torch.no_grad():
            own[name].copy_(t)

    stream_hf_weights(path, model, put)
    return model, cfg


def hf_model_on_meta(path: str | Path, *, dropout: float = 0.0) -> tuple[CausalLM, ModelConfig]:
    """The model of an HF directory built on the meta device (shapes only, no weights read)."""
    from hpcllm.model.registry import get_family

    _, cfg = read_config(model_dir(path))
    cfg.dropout = dropout
    with meta_device():
        return get_family(cfg.arch).model(cfg), cfg


def stream_hf_weights(path: str | Path, model: CausalLM, put) -> None:
    """Read the weights of an HF directory one tensor at a time, each converted to the family's layout
    and handed whole to `put(parameter name, tensor)` — which copies it into the model, or only this
    rank's part of it into a sharded one (hpcllm.parallel.materialize). `model` gives the names and
    the shapes the tensors must have (its parameters may be DTensors: their global shapes)."""
    from safetensors import SafetensorError, safe_open

    from hpcllm.model.registry import get_family

    d = model_dir(path)
    cfg = model.config
    family = get_family(cfg.arch)
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied one under each of its names
    shapes = {name: tuple(p.shape) for name, p in params.items()}
    loaded: set[str] = set()
    for file in weight_files(d):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    name = family.name_from_hf(key)
                    if name is None:
                        continue
                    if name not in shapes:
                        raise WeightsError(f"{file}: unexpected tensor '{key}' — not a {cfg.arch} checkpoint of "
                                           "this config?")
                    t = family.tensor_from_hf(name, f.get_tensor(key), cfg)
                    if tuple(t.shape) != shapes[name]:
                        raise WeightsError(f"{file}: tensor '{key}' has shape {tuple(t.shape)}, config.json implies "
                                           f"{shapes[name]}")
                    put(name, t)
                    loaded.add(name)
                    del t  # one whole tensor alive at a time
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"{file}: not a readable safetensors file ({e})") from None
    first_name = {}
    for name, p in params.items():  # a tied parameter is loaded when any of its names is
        first_name.setdefault(id(p), name)
    done = {id(params[n]) for n in loaded}
    missing = [n for n, p in params.items() if id(p) not in done and first_name[id(p)] == n]
    if missing:
        raise WeightsError(f"{d}: tensor(s) missing from the weights: {', '.join(missing[:3])}"
                           f"{' ...' if len(missing) > 3 else ''}")


def tied_names(model: torch.nn.Module) -> set[str]:
    """Names that share storage with an earlier name (e.g. lm_head.weight with the embedding)."""
    seen, tied = set(), set()
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:
            tied.add(name)
        seen.add(t.data_ptr())
    return tied


def generation_eos(path: str | Path) -> list[int]:
    """End-of-sequence ids from generation_config.json (or config.json): one id or a list."""
    d = Path(path)
    for name in ("generation_config.json", "config.json"):
        f = model_file(d, name)
        if f.is_file():
            try:
                eos = json.loads(f.read_text()).get("eos_token_id")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise WeightsError(f"{f}: not valid JSON ({e})") from None
            if eos is not None:
                return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return []


def save_hf_model(model: CausalLM, out_dir: str | Path, *, max_shard_bytes: int = 5 << 30,
                  eos_ids: list[int] | None = None, pad_id: int | None = None,
                  dtype: torch.dtype | None = None) -> Path:
    """Write config.json, safetensors (sharded above max_shard_bytes, with an index) and
    generation_config.json, each atomically, that transformers' from_pretrained loads."""
    from safetensors.torch import save_file

    from hpcllm.model.registry import get_family

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    family = get_family(model.config.arch)
    tied = tied_names(model)
    tensors = {}
    for name, t in model.state_dict().items():
        if name in tied:
            continue
        t = t.detach().to("cpu", dtype or t.dtype)
        tensors[family.name_to_hf(name)] = family.tensor_to_hf(name, t, model.config).contiguous()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, part in zip(names, shards):
        with atomic_path(out / name) as tmp:
            save_file(part, str(tmp), metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(out / INDEX, {"metadata": {"total_size": total},
                                 "weight_map": {k: n for n, part in zip(names, shards) for k in part}})
    config = family.config_to_hf(model.config)
    if dtype is not None:
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
    generation = {}
    if eos_ids:
        config["eos_token_id"] = generation["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if pad_id is not None:  # generate() pads finished rows with it (and warns without one)
        config["pad_token_id"] = generation["pad_token_id"] = pad_id
    if generation:
        write_json(out / "generation_config.json", {**generation, "do_sample": False})
    write_json(out / "config.json", config)
    return out
