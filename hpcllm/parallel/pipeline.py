"""Pipeline parallelism (`parallel.pp`) with PyTorch's engine, torch.distributed.pipelining: the
layers split into `pp` stages on the `pp` ranks of a pipeline, each step's micro-batches (the
gradient-accumulation steps, `train.accumulation`) flowing through them under ScheduleGPipe or
Schedule1F1B, composed with data parallelism (or FSDP2) over the mesh's `dp` dimension and with
tensor parallelism over its `tp` dimension (each stage's layers split as hpcllm.parallel.tensor does).

    stage s       layers [s*L/pp, ...): L/pp each, the first L % pp stages one more; the first stage
                  also runs the family's `embed`, the last its `head` and the loss
    names         a stage is the whole model with what it does not run deleted: its parameters keep
                  the whole model's names, so a DCP checkpoint by name loads into any other plan
    tied weight   an embedding tied to the output head (gpt2; llama with tie_embeddings) is held by
                  the first and the last stage; its two gradient parts are summed between them after
                  backward, so both apply the same AdamW update and stay bit-identical. It keeps its
                  first name (the embedding's), on both: the checkpoint stores it once

The family says what its pieces are (`CausalLM.embed`, `block_inputs`, `head` and the module paths
`embedding_modules`, `head_modules`); nothing here names an architecture.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn

from hpcllm.comm import Communicator
from hpcllm.model.base import CausalLM
from hpcllm.parallel.plans import FsdpPlan, Plan, as_tensor, tensor_bytes
from hpcllm.parallel.tensor import _local, _replicas, average_gradients


def stage_layers(n_layer: int, pp: int) -> list[range]:
    """The layers of each stage: n_layer / pp each, the first n_layer % pp stages one more."""
    size, extra = divmod(n_layer, pp)
    out, start = [], 0
    for stage in range(pp):
        n = size + (stage < extra)
        out.append(range(start, start + n))
        start += n
    return out


def _held(model: CausalLM, stage: int, pp: int) -> set[int]:
    """ids of the parameters stage `stage` uses: its blocks', the embedding's on the first stage, the
    head's on the last (a tied weight is both)."""
    modules = [model.blocks()[i] for i in stage_layers(model.config.n_layer, pp)[stage]]
    if stage == 0:
        modules += [model.get_submodule(path) for path in model.embedding_modules]
    if stage == pp - 1:
        modules += [model.get_submodule(path) for path in model.head_modules]
    return {id(p) for m in modules for p in m.parameters()}


def stage_parameter_names(model: CausalLM, stage: int, pp: int) -> list[str]:
    """The names (a tied weight under its first name) of the parameters stage `stage` holds."""
    held = _held(model, stage, pp)
    return [name for name, p in model.named_parameters() if id(p) in held]


def tied_parameter_names(model: CausalLM, pp: int) -> list[str]:
    """Parameters held by both the first and the last stage (a tied embedding), by their first name."""
    both = _held(model, 0, pp) & _held(model, pp - 1, pp)
    return [name for name, p in model.named_parameters() if id(p) in both]


class HeldLayers(nn.Module):
    """A stage's blocks under their indices in the whole model (`model.layers.5`, not `.0`), iterated
    in order like the ModuleList they replace."""

    def __init__(self, layers: dict[int, nn.Module]):
        super().__init__()
        for i, layer in layers.items():
            self.add_module(str(i), layer)

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)


class StageModule(nn.Module):
    """Stage `stage` of `pp` of a model: the model's own modules with what this stage does not run
    deleted (in place: `model` is pruned too and shares every module with the stage), under the
    whole model's parameter names. Its forward runs the family's pieces — `embed` on the first stage,
    the stage's blocks, `head` on the last — the code the whole model's forward runs."""

    def __init__(self, model: CausalLM, stage: int, pp: int):
        super().__init__()
        held = _held(model, stage, pp)
        blocks = model.blocks()
        self.layer_ids = list(stage_layers(model.config.n_layer, pp)[stage])
        container = next(name for name, m in model.named_modules() if m is blocks)
        _replace(model, container, HeldLayers({i: blocks[i] for i in self.layer_ids}))
        unused = (model.embedding_modules if stage > 0 else ()) + (model.head_modules if stage < pp - 1 else ())
        for path in unused:  # a module holding a weight this stage uses (a tied embedding) stays
            if not any(id(p) in held for p in model.get_submodule(path).parameters()):
                _replace(model, path, None)
        for name, child in model.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "whole", model)  # not a submodule: its modules are registered above
        self.config = model.config
        self.first, self.last = stage == 0, stage == pp - 1

    def blocks(self) -> HeldLayers:
        return self.whole.blocks()

    def configure_optimizer(self, *args, **kwargs):
        """AdamW over this stage's parameters, grouped as for the whole model."""
        return CausalLM.configure_optimizer(self, *args, **kwargs)

    def train(self, mode: bool = True):
        self.whole.training = mode  # the model's own flag decides activation checkpointing
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (first stage) or the previous stage's hidden state -> hidden state, or logits (last)."""
        model = self.whole
        positions = torch.arange(x.shape[1], device=x.device)[None]  # training: unpadded, no cache
        if self.first:
            x = model.embed(x, positions)
        extra = model.block_inputs(x, positions)
        for i, block in zip(self.layer_ids, model.blocks()):
            x = model.run_block(block, x, *extra, i, None, 0, None)
        return model.head(x) if self.last else x


def _replace(model: nn.Module, path: str, module: nn.Module | None) -> None:
    parent, _, name = path.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    if module is None:
        delattr(owner, name)
    else:
        setattr(owner, name, module)


class PipelinePlan(Plan):
    """`parallel.pp > 1`: this rank's stage of the pipeline it belongs to (its dp and tp coordinates),
    run by torch.distributed.pipelining; with tp > 1 the stage's layers are split over its tp group
    (the activations between stages are whole: every tp rank of a stage sends and receives its copy);
    gradients averaged over the stage's dp ranks (one flat allreduce per dtype), or sharded over
    them with FSDP2 (parallel.shard full)."""

    comm_wait_s = 0.0  # the dp allreduce's and the tied weight's; activations move inside the schedule

    def __init__(self, model: CausalLM, make_optimizer, comm: Communicator, mesh, *, schedule: str, fsdp: bool,
                 bf16: bool, vocab_parallel: bool = True):
        self.comm, self.mesh, self.schedule_name = comm, mesh, schedule
        self.pp, self.dp, self.tp = mesh["pp"].size(), mesh["dp"].size(), mesh["tp"].size()
        self.stage_index = mesh.get_local_rank("pp")
        self.pp_group, self.dp_group = mesh["pp"].get_group(), mesh["dp"].get_group()
        self.vocab_parallel = vocab_parallel and self.tp > 1
        if self.tp > 1:  # the whole model split by its family's tp_plan, then cut to the stage
            from hpcllm.parallel.tensor import split_model

            split_model(model, mesh["tp"], vocab_parallel=vocab_parallel)
        tied = tied_parameter_names(model, self.pp)
        self.model = stage = StageModule(model, self.stage_index, self.pp)
        self.fsdp = None
        if fsdp and self.dp > 1:
            self.fsdp = FsdpPlan(stage, make_optimizer, comm, bf16, mesh=mesh["dp"])
            self.optimizer = self.fsdp.optimizer
        else:
            self.optimizer = make_optimizer(stage)
        self.mode = "full" if self.fsdp else "none"
        self.params = [p for p in stage.parameters() if p.requires_grad]
        self.tied = [p for name, p in stage.named_parameters() if name in tied]
        self.tied_group = self._tied_group() if tied else None
        self._schedules: dict[tuple[str, int], object] = {}  # (train | eval, micro-batches) -> schedule
        self.comm_wait_s = 0.0

    def loss_context(self):
        if not self.vocab_parallel:
            return contextlib.nullcontext()
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()  # the last stage's logits are split by vocabulary over its tp ranks

    def _tied_group(self):
        """The 2-rank group of this rank's pipeline's first and last stage (each dp coordinate has
        its own, and each tp coordinate; every rank creates every group, as torch.distributed requires)."""
        if self.pp == 2:
            return self.pp_group
        ranks = self.mesh.mesh  # (pp, dp, tp) global ranks
        mine = None
        for d in range(ranks.shape[1]):
            for t in range(ranks.shape[2]):
                pair = [int(ranks[0, d, t]), int(ranks[-1, d, t])]
                group = dist.new_group(pair)
                if self.comm.rank in pair:
                    mine = group
        return mine

    # -- the schedule ----------------------------------------------------------------------------
    def _schedule(self, kind: str, micro_batches: int):
        """One PipelineStage and schedule per use (training with `accum` micro-batches, evaluation
        with the eval batches), over the same stage module: their buffers and warm-up are their own."""
        key = (kind, micro_batches)
        if key not in self._schedules:
            from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

            stage = PipelineStage(self.model, self.stage_index, self.pp, self.comm.device, group=self.pp_group)
            if kind == "train":
                # the trainer's `(loss / accum).backward()` per micro-step, exactly: each micro-batch's
                # loss divided here and the schedule's own scaling of the gradients off
                cls = Schedule1F1B if self.schedule_name == "1f1b" else ScheduleGPipe
                self._schedules[key] = cls(stage, micro_batches, loss_fn=_scaled_loss(micro_batches),
                                           scale_grads=False)
            else:
                self._schedules[key] = ScheduleGPipe(stage, micro_batches, loss_fn=CausalLM.loss, scale_grads=False)
        return self._schedules[key]

    def _run(self, schedule, batches: list, evaluate: bool) -> list[torch.Tensor]:
        """The micro-batches through the pipeline: token ids into the first stage, targets to the
        last; the last stage's per-micro-batch losses (an empty list elsewhere)."""
        x = torch.cat([b[0] for b in batches]) if self.model.first else None
        y = torch.cat([b[1] for b in batches]) if self.model.last else None
        losses: list[torch.Tensor] = []
        run = schedule.eval if evaluate else schedule.step
        args = (x,) if x is not None else ()
        run(*args, target=y, losses=losses if y is not None else None, return_outputs=False)
        return losses

    def forward_backward(self, forward, next_batch, accum: int, autocast) -> torch.Tensor:
        """Every rank of a pipeline reads the same micro-batches (the loader's position stays the
        same on all); the mean loss is the last stage's, broadcast to the pipeline."""
        batches = [next_batch() for _ in range(accum)]
        with autocast(), self.loss_context():  # the schedule runs forward, loss and backward
            losses = self._run(self._schedule("train", accum), batches, evaluate=False)
        step_loss = torch.zeros((), device=self.comm.device)
        for loss in losses:  # each already / accum: summed in the trainer's order
            step_loss += as_tensor(loss.detach())
        dist.broadcast(step_loss, group=self.pp_group, group_src=self.pp - 1)
        return step_loss

    def eval_losses(self, batches: list, autocast) -> torch.Tensor:
        with autocast(), self.loss_context():
            losses = self._run(self._schedule("eval", len(batches)), batches, evaluate=True)
        total = torch.zeros(2, device=self.comm.device)
        for loss in losses:
            total += torch.stack([as_tensor(loss).float(), torch.ones((), device=self.comm.device)])
        dist.broadcast(total, group=self.pp_group, group_src=self.pp - 1)
        return total

    # -- after backward --------------------------------------------------------------------------
    def no_sync(self):
        return contextlib.nullcontext()  # forward_backward communicates nothing but activations

    def finish(self) -> None:
        """Gradients -> their mean over the stage's dp ranks (FSDP2 has reduce-scattered them
        already); a tied weight's two parts summed between the first and the last stage."""
        import time

        t0 = time.perf_counter()
        if self.dp > 1 and self.fsdp is None:
            average_gradients([p.grad for p in self.params if p.grad is not None], self.dp_group, self.dp)
        if self.tied_group is not None:
            for p in self.tied:
                if getattr(p.grad, "placements", None) != getattr(p, "placements", None):
                    # a tp-split embedding's gradient comes back replicated: its part, as the head's
                    p.grad = p.grad.redistribute(p.device_mesh, p.placements)
                dist.all_reduce(_local(p.grad), group=self.tied_group)
        self.comm_wait_s += time.perf_counter() - t0

    def clip_grad_norm(self, max_norm: float) -> None:
        """The norm of the whole model's gradient: each stage's squares, every element counted once
        (a dp replica or FSDP shard by _replicas within the stage; the tied weight on the first stage
        only), summed over the world in one allreduce."""
        stage_ranks = self.comm.size // self.pp
        tied = {id(p) for p in self.tied} if not self.model.first else set()
        sq = torch.zeros((), device=self.comm.device, dtype=torch.float32)
        grads = [p.grad for p in self.params if p.grad is not None]
        for p in self.params:
            if p.grad is not None and id(p) not in tied:
                sq += _local(p.grad).float().pow(2).sum() / _replicas(p.grad, stage_ranks)
        dist.all_reduce(sq)
        coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for g in grads:
            _local(g).mul_(coef.to(_local(g).dtype))

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def same_start(self) -> None:
        pass  # each stage filled its part from the same whole values (hpcllm.parallel.materialize)

    def grads_bytes(self) -> int:
        return sum(tensor_bytes(p) for p in self.params)  # a gradient is held like its parameter


def _scaled_loss(accum: int):
    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return CausalLM.loss(logits, targets) / accum

    return loss_fn
