"""The `model` section of a job spec: a GPT-2 shaped model, by preset or by explicit sizes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

# name -> (n_layer, n_head, n_embd, block_size); vocab comes from the dataset's tokenizer unless set
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (4, 4, 128, 256),  # ~0.9M params + embeddings: the 2-core CPU demo
    "small": (6, 6, 384, 256),  # ~10M: the CPU training benchmark
    "gpt2": (12, 12, 768, 1024),  # 124M
    "gpt2-medium": (24, 16, 1024, 1024),  # 350M
    "gpt2-large": (36, 20, 1280, 1024),  # 774M
    "gpt2-xl": (48, 25, 1600, 1024),  # 1.5B
}


@dataclass
class ModelConfig:
    size: str = "tiny"  # a preset name, or "custom" with every size below given
    n_layer: Optional[int] = None
    n_head: Optional[int] = None
    n_embd: Optional[int] = None
    block_size: Optional[int] = None  # context length
    vocab_size: Optional[int] = None  # None: the dataset's tokenizer decides
    dropout: float = 0.0
    bias: bool = True
    layer_norm_eps: float = 1e-5
    init: str = ""  # optional HF GPT-2 safetensors file/dir to start from

    def validate(self) -> None:
        if self.size != "custom" and self.size not in PRESETS:
            raise ValueError(f"size must be one of {', '.join(PRESETS)} or custom, got {self.size!r}")
        if self.size == "custom":
            missing = [k for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"size=custom needs {', '.join(missing)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        # the sizes as the model will have them (explicit values over the preset), checked now so
        # `hpcllm config` and submit catch them, not a traceback in the middle of `train`
        sizes = dict(zip(("n_layer", "n_head", "n_embd", "block_size"), PRESETS.get(self.size, (None,) * 4)))
        sizes.update({k: getattr(self, k) for k in sizes if getattr(self, k) is not None})
        for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            v = sizes.get(k, self.vocab_size if k == "vocab_size" else None)
            if v is not None and v < 1:
                raise ValueError(f"{k} must be >= 1, got {v}")
        if sizes["n_head"] and sizes["n_embd"] and sizes["n_embd"] % sizes["n_head"]:
            raise ValueError(f"n_embd ({sizes['n_embd']}) must be divisible by n_head ({sizes['n_head']})")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps}")

    def resolve(self, vocab_size: int | None = None) -> "ModelConfig":
        """A copy with every size filled in: explicit values win over the preset."""
        base = dict(zip(("n_layer", "n_head", "n_embd", "block_size"), PRESETS.get(self.size, (None,) * 4)))
        out = dataclasses.replace(self)
        for k, v in base.items():
            if getattr(out, k) is None:
                setattr(out, k, v)
        if out.vocab_size is None:
            out.vocab_size = vocab_size
        if out.vocab_size is None:
            raise ValueError("model.vocab_size is not set and no dataset tokenizer gives it")
        if out.n_embd % out.n_head:
            raise ValueError(f"n_embd ({out.n_embd}) must be divisible by n_head ({out.n_head})")
        return out
