"""GPT-2 model, its config, and HF safetensors import/export."""

from hpcllm.model.config import PRESETS, ModelConfig

__all__ = ["PRESETS", "ModelConfig", "GPT", "KVCache", "load_hf_gpt2", "save_hf_gpt2"]


def __getattr__(name):  # keep `import hpcllm.config` free of torch
    if name in ("GPT", "KVCache"):
        from hpcllm.model import gpt

        return getattr(gpt, name)
    if name in ("load_hf_gpt2", "save_hf_gpt2"):
        from hpcllm.model import hf

        return getattr(hf, name)
    raise AttributeError(name)
