"""Every parameter a model family builds — its name and shape — worked out from the config alone,
without importing torch: what `hpcllm plan` counts on a login node (seconds saved: torch's import).

    shapes = parameter_shapes(cfg)       # the family's table (hpcllm/model/<family>_config.py)
    shapes = model_shapes(model)         # the same, read off a built model (on the meta device or not)
    shapes.params                        # [(name, shape)] as model.named_parameters() lists them
    shapes.tied                          # {second name: first name}: the output head tied to the embedding

tests/model/test_shapes.py checks the two agree exactly for every family, sizes, biases, tying and
grouped-query attention. The pipeline's stage boundaries (`blocks`, `embedding_modules`,
`head_modules`) come with them: hpcllm.parallel.estimate splits a model by stage from these alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hpcllm.model.config import ModelConfig


@dataclass(frozen=True)
class ModelShapes:
    config: ModelConfig
    params: tuple[tuple[str, tuple[int, ...]], ...]  # a tied weight once, under its first name
    tied: tuple[tuple[str, str], ...]  # (second name, first name) of each weight with two names
    blocks: str  # the path of the blocks' container: block i's parameters are "<blocks>.<i>.*"
    embedding_modules: tuple[str, ...]  # what the first pipeline stage runs before the blocks
    head_modules: tuple[str, ...]  # what the last one runs after them
    lookup_only: tuple[str, ...]  # parameters only looked up, never multiplied (CausalLM.lookup_only_parameters)

    def num_params(self, non_embedding: bool = True) -> int:
        """CausalLM.num_params of the model these are the shapes of."""
        skip = set(self.lookup_only) if non_embedding else set()
        return sum(math.prod(shape) for name, shape in self.params if name not in skip)

    def names_of(self, name: str) -> tuple[str, ...]:
        """A parameter's names: its own, and the second name of a tied weight."""
        return (name, *(second for second, first in self.tied if first == name))


def parameter_shapes(cfg: ModelConfig) -> ModelShapes:
    """The shapes of the model `build_model(cfg)` builds, from the family's torch-free table."""
    from hpcllm.model.registry import get_family_config

    if cfg.ffn_dim is None or cfg.vocab_size is None:  # as the models' constructors do
        cfg = cfg.resolve(cfg.vocab_size)
    return get_family_config(cfg.arch).parameter_shapes(cfg)


def blocks_path(model) -> str:
    """The module path of `model.blocks()` (e.g. `model.layers`)."""
    blocks = model.blocks()
    return next(name for name, m in model.named_modules() if m is blocks)


def model_shapes(model) -> ModelShapes:
    """The shapes of a built model (a CausalLM, whole: before any pipeline cut or tp split)."""
    first: dict[int, str] = {}
    params, tied = [], []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied.append((name, first[id(p)]))
        else:
            first[id(p)] = name
            params.append((name, tuple(p.shape)))
    return ModelShapes(config=model.config, params=tuple(params), tied=tuple(tied), blocks=blocks_path(model),
                       embedding_modules=tuple(model.embedding_modules), head_modules=tuple(model.head_modules),
                       lookup_only=tuple(first[id(p)] for p in model.lookup_only_parameters()))
