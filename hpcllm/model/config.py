"""The `model` section of a job spec: one config for every model family.

`arch` picks the family (hpcllm/model/registry.py); `size` a preset of that family, or `custom`
with the sizes given. Each family reads the fields it implements and refuses, when the spec is
loaded, a field it does not (a GPT-2 has no grouped-query attention): nothing is silently ignored.
A model that comes from an HF directory (`model.init`, `infer.model`) takes its config from that
directory's config.json instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from hpcllm.fields import path_field

SIZE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size")


@dataclass
class ModelConfig:
    arch: str = "gpt2"  # the family: gpt2 | llama (Llama 2/3.x, Mistral, Qwen2, Qwen3)
    size: str = "tiny"  # a preset of the family, or "custom" with every size below given
    n_layer: Optional[int] = None
    n_head: Optional[int] = None  # query heads
    n_kv_head: Optional[int] = None  # key/value heads (grouped-query attention); None: = n_head
    n_embd: Optional[int] = None  # hidden size
    head_dim: Optional[int] = None  # None: n_embd // n_head
    ffn_dim: Optional[int] = None  # MLP inner size; None: the family's default (gpt2: 4 * n_embd)
    block_size: Optional[int] = None  # context length
    vocab_size: Optional[int] = None  # None: the dataset's tokenizer decides
    dropout: float = 0.0
    bias: Optional[bool] = None  # biases in linear layers and norms (gpt2: true, llama: false)
    qkv_bias: Optional[bool] = None  # bias on the q/k/v projections only (Qwen2)
    qk_norm: Optional[bool] = None  # RMSNorm on each head's queries and keys (Qwen3)
    norm_eps: Optional[float] = None  # LayerNorm / RMSNorm epsilon; None: the family's default
    tie_embeddings: Optional[bool] = None  # output head shares the token embedding
    activation: Optional[Literal["gelu_tanh", "gelu", "relu", "silu"]] = None  # None: family default
    rope_theta: Optional[float] = None  # rotary embedding base (llama)
    rope_scaling: dict[str, Any] = field(default_factory=dict)  # {type: linear|llama3, factor, ...}
    init: str = path_field("")  # an HF model directory (or GPT-2 safetensors file) to start from

    def validate(self) -> None:
        from hpcllm.model.registry import check_config, family_info

        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm_eps is not None and not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        presets = family_info(self.arch).presets  # ValueError naming the families if unknown
        if self.size != "custom" and self.size not in presets:
            raise ValueError(f"size must be one of {', '.join(presets)} or custom for arch {self.arch}, "
                             f"got {self.size!r}")
        if self.size == "custom" and not self.init:
            missing = [k for k in SIZE_FIELDS if getattr(self, k) is None]
            if missing:
                raise ValueError(f"size=custom needs {', '.join(missing)}")
        check_config(self.with_preset())

    def with_preset(self) -> "ModelConfig":
        """A copy with the preset's values under the explicit ones (vocab may still be None)."""
        from hpcllm.model.registry import family_info

        out = dataclasses.replace(self, rope_scaling=dict(self.rope_scaling))
        for k, v in family_info(self.arch).presets.get(self.size, {}).items():
            if getattr(out, k) in (None, {}):
                setattr(out, k, dict(v) if isinstance(v, dict) else v)
        return out

    def resolve(self, vocab_size: int | None = None) -> "ModelConfig":
        """A copy with every field filled in: explicit values, then the preset, then the family's
        defaults. Raises ValueError (naming the field) if the result is not a valid model."""
        from hpcllm.model.registry import check_config, fill_defaults

        out = self.with_preset()
        if out.vocab_size is None:
            out.vocab_size = vocab_size
        if out.vocab_size is None:
            raise ValueError("model.vocab_size is not set and no dataset tokenizer gives it")
        for k in SIZE_FIELDS:
            if getattr(out, k) is None:
                raise ValueError(f"model.{k} is not set")
        check_config(out)
        fill_defaults(out)
        return out
