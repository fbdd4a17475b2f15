"""Model families behind one registry (registry.py): `gpt2` (gpt.py) and `llama` (llama.py: Llama,
Mistral, Qwen2, Qwen3), their config (config.py), HF directories in and out (hf.py). Without torch:
each family's config.json mapping and parameter shapes (gpt_config.py, llama_config.py, read through
shapes.py and hf_config.py), the presets and checks (registry.py).

    model = build_model(spec.model.resolve(vocab_size))     # whatever the family
    model, cfg = load_hf_model("path/to/hf/dir", dtype=torch.bfloat16)
"""

from hpcllm.model.config import ModelConfig

__all__ = ["ModelConfig", "build_model", "build_model_on_meta", "load_hf_model", "save_hf_model", "WeightsError"]


def build_model(cfg: ModelConfig):
    """The family's model for a resolved config (random weights: call init_weights(seed))."""
    from hpcllm.model.registry import get_family

    return get_family(cfg.arch).model(cfg)


def build_model_on_meta(cfg: ModelConfig):
    """build_model on the meta device: shapes only, nothing allocated or initialized (the caller
    materializes it or loads its weights)."""
    from hpcllm.model.base import meta_device

    with meta_device():
        return build_model(cfg)


def __getattr__(name):  # keep `import hpcllm.config` free of torch
    if name in ("load_hf_model", "save_hf_model", "WeightsError"):
        from hpcllm.model import hf

        return getattr(hf, name)
    raise AttributeError(name)
