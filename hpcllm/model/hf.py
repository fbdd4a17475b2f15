"""Import/export HF GPT-2 weights (`model.safetensors` + `config.json`) — safetensors only, no pickle.

HF's GPT-2 uses Conv1D layers whose weights are stored (in, out); ours are nn.Linear (out, in), so
the four projection matrices are transposed on the way in and out. Everything else maps by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hpcllm.atomic import atomic_path, write_json
from hpcllm.errors import DataError
from hpcllm.model.config import ModelConfig
from hpcllm.model.gpt import GPT

_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in old HF checkpoints


class WeightsError(DataError, ValueError):
    """A weights file or HF directory hpcllm cannot load (exit 5, like other bad input data)."""


def _files(path: str | Path) -> tuple[Path, Path | None]:
    p = Path(path)
    if p.is_dir():
        st = p / "model.safetensors"
        cfg = p / "config.json"
        return st, cfg if cfg.exists() else None
    return p, (p.parent / "config.json") if (p.parent / "config.json").exists() else None


def config_from_hf(cfg_file: Path | None, tensors: dict) -> ModelConfig:
    if cfg_file is not None:
        c = json.loads(cfg_file.read_text())
        return ModelConfig(
            size="custom", n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"], block_size=c["n_positions"],
            vocab_size=c["vocab_size"], layer_norm_eps=c.get("layer_norm_epsilon", 1e-5),
        )
    # no config.json: infer sizes from shapes (n_head cannot be inferred; GPT-2 uses 64-dim heads)
    V, C = tensors["transformer.wte.weight"].shape
    n_layer = 1 + max(int(k.split(".")[2]) for k in tensors if k.startswith("transformer.h."))
    return ModelConfig(size="custom", n_layer=n_layer, n_head=C // 64, n_embd=C,
                       block_size=tensors["transformer.wpe.weight"].shape[0], vocab_size=V)


def load_hf_gpt2(path: str | Path, device="cpu") -> tuple[GPT, ModelConfig]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    st, cfg_file = _files(path)
    if not st.is_file():
        raise WeightsError(f"{st}: no such safetensors file")
    try:
        tensors = load_file(str(st), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{st}: not a readable safetensors file ({e})") from None
    # some exports drop the "transformer." prefix
    tensors = {(k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"): v for k, v in tensors.items()}
    try:
        cfg = config_from_hf(cfg_file, tensors)
    except (KeyError, ValueError) as e:
        raise WeightsError(f"{st}: cannot work out the model shape ({e} missing)") from None
    model = GPT(cfg)
    own = model.state_dict()
    for name, param in own.items():
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight
        if name not in tensors:
            raise WeightsError(f"{st}: missing tensor '{name}'")
        t = tensors[name]
        if name.endswith(_TRANSPOSED):
            t = t.t()
        if t.shape != param.shape:
            raise WeightsError(f"{st}: tensor '{name}' has shape {tuple(t.shape)}, expected {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(t.to(param.dtype))
    extra = [k for k in tensors if k not in own and not k.endswith(_HF_BUFFERS)]
    if extra:
        raise WeightsError(f"{st}: unexpected tensor(s) {extra[:3]} — not a GPT-2 checkpoint?")
    return model.to(device), cfg


def save_hf_gpt2(model: GPT, out_dir: str | Path) -> Path:
    """Write `model.safetensors` + `config.json` that transformers' GPT2LMHeadModel loads."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    c = model.config
    tensors = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        t = p.detach().to("cpu", torch.float32)
        tensors[name] = (t.t() if name.endswith(_TRANSPOSED) else t).contiguous()
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
        "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
        "n_head": c.n_head, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": c.layer_norm_eps,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": True,
        "bos_token_id": c.vocab_size - 1, "eos_token_id": c.vocab_size - 1,
    }
    write_json(out / "config.json", config)
    return out
