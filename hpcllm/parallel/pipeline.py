"""Pipeline parallelism (`parallel.pp`) with PyTorch's engine, torch.distributed.pipelining: the
layers split into stages on the `pp` ranks of a pipeline (hpcllm.parallel.stages: which layers, which
rank, the modules a rank holds), each step's micro-batches (the gradient-accumulation steps,
`train.accumulation`) flowing through them, composed with data parallelism (or FSDP2) over the
mesh's `dp` dimension and with tensor parallelism over its `tp` dimension (each stage's layers split
as hpcllm.parallel.tensor does).

    gpipe, 1f1b       one stage per rank: ScheduleGPipe, Schedule1F1B
    interleaved1f1b   V = parallel.pp_virtual_stages stages per rank (rank r runs stages r, r + pp,
                      ...): ScheduleInterleaved1F1B — a micro-batch passes every rank V times, in
                      stages 1/V as long, so the fill and drain (the bubble) are V times shorter
    loopedbfs         the same stages, ScheduleLoopedBFS: breadth first (every micro-batch through
                      a rank's first stage, then its next); the same bubble, any micro-batch count
    tied weight       the embedding tied to the output head is held by the first and the last stage
                      (pp ranks 0 and pp-1); its two gradient parts are summed between them after
                      backward, so both apply the same AdamW update and stay bit-identical
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from hpcllm.comm import Communicator
from hpcllm.model.base import CausalLM
from hpcllm.parallel.parts import as_tensor, local_tensor
from hpcllm.parallel.stages import StageModule
from hpcllm.parallel.tensor import DTensorPlan


class PipelinePlan(DTensorPlan):
    """`parallel.pp > 1`: this rank's stages of the pipeline it belongs to (its dp and tp coordinates),
    run by torch.distributed.pipelining; with tp > 1 the stages' layers are split over its tp group
    (the activations between stages are whole: every tp rank of a stage sends and receives its copy;
    under sequence parallelism each tp rank sends and receives its slice of the positions only);
    gradients averaged over the stage's dp ranks (one flat allreduce per dtype), the optimizer state
    sharded over them (parallel.shard optimizer: ZeRO-1), or everything sharded over them with FSDP2
    (parallel.shard full: each stage its own FSDP2 root, as PipelineStage expects)."""

    def __init__(self, part: StageModule, optimizer, comm: Communicator, mesh, *, schedule: str, mode: str,
                 bucket_mb: float, vocab_parallel: bool = True, sequence_parallel: bool = False):
        """`part`: this rank's stages, cut (and split, and sharded) by hpcllm.parallel.parallelize."""
        self.comm, self.mesh, self.schedule_name = comm, mesh, schedule
        self.pp, self.dp, self.tp = mesh["pp"].size(), mesh["dp"].size(), mesh["tp"].size()
        self.virtual_stages, self.n_stages = len(part.stages), part.n_stages
        self.pp_rank = mesh.get_local_rank("pp")
        self.stage_indices = part.stages
        self.pp_group, self.dp_group = mesh["pp"].get_group(), mesh["dp"].get_group()
        self.vocab_parallel = vocab_parallel and self.tp > 1
        self.sequence_parallel = sequence_parallel and self.tp > 1
        self.model, self.optimizer = part, optimizer
        self.chunks = part.chunks  # what each PipelineStage runs: the StageModule itself with one stage
        self.params = [p for p in part.parameters() if p.requires_grad]
        self._reduce_over_dp(mode, bucket_mb)
        self.tied = [p for name, p in part.named_parameters() if name in part.tied_names]
        self.tied_group = self._tied_group() if part.tied_names else None
        self._schedules: dict[tuple[str, int], object] = {}  # (train | eval, micro-batches) -> schedule

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
        """One schedule, with its own PipelineStages, per use (training with `accum` micro-batches,
        evaluation with the eval batches), over the same chunk modules: their buffers and warm-up
        are their own."""
        key = (kind, micro_batches)
        if key not in self._schedules:
            from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                                      ScheduleInterleaved1F1B, ScheduleLoopedBFS)

            stages = [PipelineStage(chunk, index, self.n_stages, self.comm.device, group=self.pp_group)
                      for chunk, index in zip(self.chunks, self.stage_indices)]
            if kind == "train":
                # the trainer's `(loss / accum).backward()` per micro-step, exactly: each micro-batch's
                # loss divided here and the schedule's own scaling of the gradients off
                loss_fn = _scaled_loss(micro_batches)
                if self.virtual_stages > 1:
                    cls = ScheduleLoopedBFS if self.schedule_name == "loopedbfs" else ScheduleInterleaved1F1B
                    schedule = cls(stages, micro_batches, loss_fn=loss_fn, scale_grads=False)
                else:
                    cls = Schedule1F1B if self.schedule_name == "1f1b" else ScheduleGPipe
                    schedule = cls(stages[0], micro_batches, loss_fn=loss_fn, scale_grads=False)
            elif self.virtual_stages > 1:
                # forward only, any number of batches: every batch through a rank's first chunk, then
                # its next (the interleaved order asks for a multiple of its rounds of micro-batches)
                schedule = ScheduleLoopedBFS(stages, micro_batches, loss_fn=CausalLM.loss, scale_grads=False)
            else:
                schedule = ScheduleGPipe(stages[0], micro_batches, loss_fn=CausalLM.loss, scale_grads=False)
            self._schedules[key] = schedule
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

    def _sum_tied_grads(self) -> None:
        """A tied weight's two parts summed between the first and the last stage, before the dp
        reduction (under ZeRO-1 the first and the last stage then hold the same rows of its
        gradient, and make the same update)."""
        if self.tied_group is not None:
            for p in self.tied:
                dist.all_reduce(local_tensor(p.grad), group=self.tied_group)

    def _counted_elsewhere(self) -> set[int]:
        return {id(p) for p in self.tied} if not self.model.first else set()  # on pp rank 0's only

    def _norm_ranks(self) -> int:
        return self.comm.size // self.pp  # the ranks of this stage


def _scaled_loss(accum: int):
    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return CausalLM.loss(logits, targets) / accum

    return loss_fn
