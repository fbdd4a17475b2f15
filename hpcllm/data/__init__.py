"""Sharded HDF5 token datasets: tokenizers, `prepare`, the rank-aware loader (docs/data-format.md)."""

__all__ = ["Dataset", "TokenLoader", "open_dataset", "load_tokenizer", "open_prompt_dataset"]


def __getattr__(name):  # keep `import hpcllm.config` light: no h5py/torch until used
    if name in ("Dataset", "TokenLoader", "open_dataset", "load_tokenizer"):
        from hpcllm.data import loader

        return getattr(loader, name)
    if name == "open_prompt_dataset":
        from hpcllm.data import prompts

        return prompts.open_prompt_dataset
    raise AttributeError(name)
