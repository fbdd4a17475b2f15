"""A pipeline's stages (`parallel.pp`, `parallel.pp_virtual_stages`): which layers each runs, which
rank runs it, and the modules a rank holds for its stages. hpcllm.parallel.pipeline runs them.

    stages        pp x V of them (V = parallel.pp_virtual_stages: 1, or 2+ under the interleaved
                  schedule); stage s holds layers [s*L/(pp V), ...): L/(pp V) each, the first
                  L % (pp V) stages one more; the first stage also runs the family's `embed`, the
                  last its `head` and the loss
    ranks         stage s runs on pp rank s % pp — PyTorch's "loop" assignment, the one its interleaved
                  schedules compute their orders for (pipelining._utils.generate_stage_to_rank_mapping):
                  pp rank r runs stages r, r + pp, ..., r + (V-1) pp, its chunks. Layers [0, L/V) are
                  spread over all the ranks once, then the next L/V again, ...
    names         a rank's part is the whole model with what none of its stages runs deleted: its
                  parameters keep the whole model's names, so a DCP checkpoint by name loads into
                  any other plan, whatever the stages per rank
    tied weight   an embedding tied to the output head (gpt2; llama with tie_embeddings) is held by
                  the first and the last stage — pp rank 0's first chunk and pp rank pp-1's last,
                  whatever V — under its first name (the embedding's): the checkpoint stores it once

The family says what its pieces are (`CausalLM.embed`, `block_inputs`, `head` and the module paths
`embedding_modules`, `head_modules`); nothing here names an architecture.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from hpcllm.errors import TrainingError
from hpcllm.model.base import CausalLM
from hpcllm.parallel.layout import stage_layers


def _stage_modules(model: CausalLM, stage: int, n_stages: int) -> list[nn.Module]:
    """What stage `stage` runs: its blocks, the embedding on the first stage, the head on the last."""
    modules = [model.blocks()[i] for i in stage_layers(model.config.n_layer, n_stages)[stage]]
    if stage == 0:
        modules += [model.get_submodule(path) for path in model.embedding_modules]
    if stage == n_stages - 1:
        modules += [model.get_submodule(path) for path in model.head_modules]
    return modules


def _held(model: CausalLM, stages: list[int], n_stages: int) -> set[int]:
    """ids of the parameters `stages` use (a tied weight is the embedding's and the head's)."""
    return {id(p) for s in stages for m in _stage_modules(model, s, n_stages) for p in m.parameters()}


def tied_parameter_names(model: CausalLM, n_stages: int) -> list[str]:
    """Parameters held by both the first and the last stage (a tied embedding), by their first name."""
    both = _held(model, [0], n_stages) & _held(model, [n_stages - 1], n_stages)
    return [name for name, p in model.named_parameters() if id(p) in both]


class HeldLayers(nn.Module):
    """A rank's blocks under their indices in the whole model (`model.layers.5`, not `.0`), iterated
    in order like the ModuleList they replace."""

    def __init__(self, layers: dict[int, nn.Module]):
        super().__init__()
        for i, layer in layers.items():
            self.add_module(str(i), layer)

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def layer(self, index: int) -> nn.Module:
        """Block `index` of the whole model."""
        return self._modules[str(index)]


class StageModule(nn.Module):
    """The stages `stages` (of `n_stages`) of a model on one rank: the model's own modules with what
    none of them runs deleted (in place: `model` is pruned too and shares every module), under the
    whole model's parameter names — the rank's parameters, optimizer state and checkpoint. A stage
    runs the family's pieces — `embed` on the first, its blocks, `head` on the last — the code the
    whole model's forward runs. With one stage it is itself the module its PipelineStage runs;
    with several, each runs as a StageChunk of it (`chunks`). Under sequence parallelism the hidden
    state passed between stages is this tp rank's slice of the positions (1/`sequence_split`)."""

    def __init__(self, model: CausalLM, stages: list[int], n_stages: int, sequence_split: int = 1):
        super().__init__()
        self.stages, self.n_stages, self.sequence_split = list(stages), n_stages, sequence_split
        # held by both the first and the last stage (a tied embedding): their gradient parts are summed
        self.tied_names = tied_parameter_names(model, n_stages)
        layers = stage_layers(model.config.n_layer, n_stages)
        self.layer_ids = {s: list(layers[s]) for s in self.stages}
        # each stage's modules, taken before pruning (a chunk registers them, and a module holding a
        # weight the stage uses: the tied embedding's other side, which FSDP2 must see with it)
        chunk_modules = {s: self._chunk_modules(model, s) for s in self.stages}
        held = _held(model, self.stages, n_stages)
        blocks = model.blocks()
        container = next(name for name, m in model.named_modules() if m is blocks)
        _replace(model, container, HeldLayers({i: blocks[i] for s in self.stages for i in self.layer_ids[s]}))
        self.first, self.last = 0 in self.stages, n_stages - 1 in self.stages  # holds the first / last stage
        unused = (model.embedding_modules if not self.first else ()) + (model.head_modules if not self.last else ())
        for path in unused:  # a module holding a weight a stage here uses (a tied embedding) stays
            if not any(id(p) in held for p in model.get_submodule(path).parameters()):
                _replace(model, path, None)
        for name, child in model.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "whole", model)  # not a submodule: its modules are registered above
        self.config = model.config
        # not submodules either: a chunk's modules are this module's, under their whole-model names
        self.chunks = [self] if len(self.stages) == 1 else [StageChunk(self, s, chunk_modules[s]) for s in self.stages]

    def _chunk_modules(self, model: CausalLM, stage: int) -> list[nn.Module]:
        runs = _stage_modules(model, stage, self.n_stages)
        used = {id(p) for m in runs for p in m.parameters()}
        ids = {id(m) for m in runs}
        around = [model.get_submodule(path) for path in model.embedding_modules + model.head_modules]
        return runs + [m for m in around if id(m) not in ids and any(id(p) in used for p in m.parameters())]

    def blocks(self) -> HeldLayers:
        return self.whole.blocks()

    def configure_optimizer(self, *args, **kwargs):
        """AdamW over this rank's parameters (every stage's), grouped as for the whole model."""
        return CausalLM.configure_optimizer(self, *args, **kwargs)

    def train(self, mode: bool = True):
        self.whole.training = mode  # the model's own flag decides activation checkpointing
        return super().train(mode)

    def run_stage(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        """Token ids (first stage) or the previous stage's hidden state -> hidden state, or logits (last)."""
        model = self.whole
        length = x.shape[1] if stage == 0 else x.shape[1] * self.sequence_split  # (a slice of the positions)
        positions = torch.arange(length, device=x.device)[None]  # training: unpadded, no cache
        if stage == 0:
            x = model.embed(x, positions)
        extra = model.block_inputs(x, positions)
        layers = model.blocks()
        for i in self.layer_ids[stage]:
            x = model.run_block(layers.layer(i), x, *extra, i, None, None)
        return model.head(x) if stage == self.n_stages - 1 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.stages) != 1:
            raise TrainingError(f"internal: a rank with {len(self.stages)} stages runs them as its chunks, not whole")
        return self.run_stage(self.stages[0], x)


class StageChunk(nn.Module):
    """One stage of a rank that runs several (the interleaved schedule): the module its PipelineStage
    runs and, under parallel.shard full, the unit FSDP2 shards (its blocks, then itself). It holds
    the modules of its stage only, shared with the rank's StageModule: a rank's chunks share nothing."""

    def __init__(self, part: StageModule, stage: int, modules: list[nn.Module]):
        super().__init__()
        self.stage = stage
        self.held = nn.ModuleList(modules)
        object.__setattr__(self, "part", part)  # not a submodule: it holds the rank's other stages too
        self._blocks = [part.whole.blocks().layer(i) for i in part.layer_ids[stage]]

    def blocks(self) -> list[nn.Module]:
        return list(self._blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.part.run_stage(self.stage, x)


def _replace(model: nn.Module, path: str, module: nn.Module | None) -> None:
    parent, _, name = path.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    if module is None:
        delattr(owner, name)
    else:
        setattr(owner, name, module)
