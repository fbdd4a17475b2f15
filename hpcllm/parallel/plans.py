"""A sharding plan: how the model's parameters, gradients and optimizer state are held across the
ranks, and the one interface the trainer steps through whatever the layout (hpcllm.parallel.layout).

    model = parallelize(model, layout, comm, ...)     # the model transforms (hpcllm.parallel.parallelize)
    plan = build_plan(model, layout, comm, ...)       # the optimizer and the gradient reduction (.build)
    loss = plan.forward_backward(forward, next_batch, accum, autocast)   # the step's micro-batches:
    plan.finish()                              # gradients are the mean over ranks (or this rank's part)
    plan.clip_grad_norm(1.0); plan.step(); plan.zero_grad()
    state = plan.state_dict()                  # model and optimizer by parameter name, for the checkpoint

The gradient reduction is chosen once, when the plan is made, by the shard mode: bucketed allreduce
during backward (`GradSync`, every backend), ZeRO-1 (`self.zero`: hpcllm.parallel.zero), or FSDP2
(inside forward and backward). `finish()` is the one place communication time is kept
(`comm_wait_s`); `step()`, `state_dict()` and `grads_bytes()` ask `self.zero` the same way in every plan.

`state_dict()` is the same tree in every mode — {"model": {name: tensor}, "optim": {name: {"step",
"exp_avg", "exp_avg_sq"}}} — with plain tensors where a rank holds all of a value and DTensors
(placement Shard(0)) where it holds a part. torch.distributed.checkpoint saves each rank's part and
loads into any other layout, which is what makes a checkpoint resumable on any number of ranks and in
any mode.

This module holds the base and the plans of a whole model on every rank (1-D: data parallel, ZeRO-1,
FSDP2); hpcllm.parallel.tensor and .pipeline the plans whose parameters are parts.
"""

from __future__ import annotations

import contextlib
import time

import torch

from hpcllm.comm import Communicator
from hpcllm.parallel.grad_sync import GradSync
from hpcllm.parallel.parts import as_tensor, model_state, peak_memory_bytes, tensor_bytes
from hpcllm.parallel.zero import Zero1, adopt_sharded_optim_state, sharded_optim_state


class Plan:
    """`none`: every rank holds everything; gradients are allreduced in buckets (GradSync)."""

    mode = "none"
    tp = 1
    sequence_parallel = False
    pp = 1
    virtual_stages = 1  # pipeline stages per pp rank
    gsync: GradSync | None = None  # the bucketed gradient sync of a whole model (its buffers hold the gradients)
    zero = None  # ZeRO-1 (Zero1 or Zero1Parts): the optimizer state and step 1/N per rank
    comm_wait_s = 0.0  # seconds blocked in finish(): communication not hidden by backward (the caller resets it)

    def __init__(self, model, optimizer, comm: Communicator, bucket_mb: float):
        self.model, self.optimizer, self.comm = model, optimizer, comm
        self.gsync = GradSync(list(model.parameters()), comm, bucket_mb)

    # -- forward and backward --------------------------------------------------------------------
    def loss_context(self):
        """Where forward and backward of the loss run (tensor parallelism: on vocabulary-split logits)."""
        return contextlib.nullcontext()

    def forward_backward(self, forward, next_batch, accum: int, autocast) -> torch.Tensor:
        """Forward and backward of one step's `accum` micro-batches (`next_batch()` each), gradients
        communicated on the last one only; returns the step's mean loss (the same on every rank of a
        model replica). `forward(x, y)` is the model (or its compiled form), `autocast()` the
        train.dtype context. The pipeline plan runs the micro-batches through its stages instead."""
        step_loss = torch.zeros((), device=self.comm.device)
        for micro in range(accum):
            x, y = next_batch()
            last = micro == accum - 1
            with (contextlib.nullcontext() if last else self.no_sync()), autocast(), self.loss_context():
                _, loss = forward(x, y)
                (loss / accum).backward()
            step_loss += as_tensor(loss.detach()) / accum
        return step_loss

    def eval_losses(self, batches: list, autocast) -> torch.Tensor:
        """[sum of the losses of `batches` (x, y), their number] on this rank, in evaluation (no grad)."""
        total = torch.zeros(2, device=self.comm.device)
        for x, y in batches:
            with autocast(), self.loss_context():
                _, loss = self.model(x, y)
            total += torch.stack([as_tensor(loss).float(), torch.ones((), device=self.comm.device)])
        return total

    def no_sync(self):
        return self.gsync.no_sync()

    # -- after backward ------------------------------------------------------------------------
    @property
    def reduces_after_backward(self) -> bool:
        """Whether finish() has communication to wait for (not with one rank, nor under FSDP2, whose
        collectives run inside forward and backward and are not measured apart)."""
        return self.gsync.active

    def finish(self) -> None:
        """Gradients -> their mean over the ranks that share them (or this rank's rows of it, ZeRO-1);
        the time blocked here is the step's communication not hidden by backward (`comm_wait_s`)."""
        if not self.reduces_after_backward:
            return
        t0 = time.perf_counter()
        self._reduce()
        self.comm_wait_s += time.perf_counter() - t0

    def _reduce(self) -> None:
        self.gsync.finish()

    def clip_grad_norm(self, max_norm: float) -> None:
        if self.zero is not None:
            self.zero.clip_grad_norm(max_norm)
        else:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def step(self) -> None:
        if self.zero is not None:  # this rank's rows updated, every rank's all-gathered into the parameters
            self.zero.step()
        else:
            self.optimizer.step()

    def zero_grad(self) -> None:
        self.gsync.zero_grad()

    def same_start(self) -> None:
        """Every rank starts from rank 0's parameters (an HF init read on each rank is the same
        anyway; this makes it certain)."""
        self.gsync.broadcast_parameters(list(self.model.parameters()))

    # -- checkpoint state ----------------------------------------------------------------------
    def _optim_entry(self, p: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        st = self.optimizer.state.get(p)
        if not st:  # before the first step: zeros to load into (AdamW's own initial state)
            st = {"step": torch.zeros((), dtype=torch.float32), "exp_avg": torch.zeros_like(p.detach()),
                  "exp_avg_sq": torch.zeros_like(p.detach())}
        return st

    def _zero_layout(self, p):
        """(mesh, placements) of p's ZeRO-1 rows as a DTensor of the whole parameter."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        if self.zero is not None:
            return {"model": model_state(self.model),
                    "optim": sharded_optim_state(self.zero, self.model, self._zero_layout)}
        return {"model": model_state(self.model),
                "optim": {n: self._optim_entry(p) for n, p in self.model.named_parameters()}}

    def load_state_dict(self, state: dict) -> None:
        """After an in-place load into a tree from `state_dict()`: adopt its optimizer tensors."""
        if self.zero is not None:
            adopt_sharded_optim_state(self.zero, self.model, state)
            return
        for name, p in self.model.named_parameters():
            self.optimizer.state[p] = state["optim"][name]

    # -- memory --------------------------------------------------------------------------------
    def grads_bytes(self) -> int:
        """Gradients as held (in the sync's buckets, or like their parameters), and ZeRO-1's buffers."""
        if self.gsync is not None and self.gsync.buckets:
            held = sum(b.buffer.numel() * b.buffer.element_size() for b in self.gsync.buckets)
        else:
            held = sum(tensor_bytes(p) for p in self.model.parameters() if p.requires_grad)
        return held + (self.zero.communication_bytes() if self.zero is not None else 0)

    def memory(self) -> dict[str, int]:
        """Bytes on this rank: parameters, gradients (and the buffers they are reduced in), optimizer
        state, and the peak of the process (CUDA peak allocated, or peak RSS on CPU)."""
        optim = sum(tensor_bytes(t) for st in self.optimizer.state.values() for t in st.values()
                    if torch.is_tensor(t))
        return {"params_bytes": sum(tensor_bytes(p) for p in self.model.parameters()),
                "grads_bytes": self.grads_bytes(), "optimizer_bytes": optim,
                "peak_bytes": peak_memory_bytes(self.comm.device)}


class Zero1Plan(Plan):
    """`optimizer`: ZeRO-1 (hpcllm.parallel.zero) — the optimizer state and step are 1/N per rank;
    its reduce-scatters are the gradient sync's bucket collectives."""

    mode = "optimizer"

    def __init__(self, model, optimizer, comm: Communicator, bucket_mb: float):
        self.model, self.comm = model, comm
        self.gsync = self.zero = Zero1(model, comm, bucket_mb, optimizer)
        self.optimizer = self.zero.optimizer
        self._mesh = None  # the DeviceMesh of the checkpoint's DTensors, made at the first checkpoint

    def _zero_layout(self, p):
        from torch.distributed.tensor import Shard

        from hpcllm.parallel.layout import device_mesh

        if self._mesh is None:
            self._mesh = device_mesh(self.comm)
        return self._mesh, [Shard(0)]


class FsdpPlan(Plan):
    """`full`: FSDP2 (`fully_shard` per block, then the root: hpcllm.parallel.parallelize) —
    parameters, gradients and optimizer state are DTensors sharded on dim 0; parameters are
    all-gathered per block for forward and backward and gradients reduce-scattered (fp32 reduction;
    bf16 parameters under train.dtype bf16)."""

    mode = "full"
    reduces_after_backward = False  # FSDP2's collectives are waited on inside forward/backward

    def __init__(self, model, optimizer, comm: Communicator):
        self.model, self.optimizer, self.comm = model, optimizer, comm

    @contextlib.contextmanager
    def no_sync(self):
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def same_start(self) -> None:
        pass  # every rank filled its part from the same whole values (hpcllm.parallel.materialize)
