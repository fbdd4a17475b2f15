"""A sharding plan: how the model's parameters, gradients and optimizer state are held across the
ranks, and the one interface the trainer steps through whatever the mode (`parallel.shard`).

    plan = build_plan(spec, model, comm)
    loss = plan.forward_backward(forward, next_batch, accum, autocast)   # the step's micro-batches:
    plan.finish()                              # gradients are the mean over ranks (or this rank's part)
    plan.clip_grad_norm(1.0); plan.step(); plan.zero_grad()
    state = plan.state_dict()                  # model and optimizer by parameter name, for the checkpoint

`state_dict()` is the same tree in every mode — {"model": {name: tensor}, "optim": {name: {"step",
"exp_avg", "exp_avg_sq"}}} — with plain tensors where a rank holds all of a value and DTensors
(placement Shard(0)) where it holds a part. torch.distributed.checkpoint saves each rank's part and
loads into any other layout, which is what makes a checkpoint resumable on any number of ranks and in
any mode.
"""

from __future__ import annotations

import contextlib
import resource

import torch

from hpcllm.comm import Communicator
from hpcllm.train.grad_sync import GradSync

MODES = ("none", "optimizer", "full")


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's part on this rank (sharing its storage), a plain tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def tensor_bytes(t: torch.Tensor) -> int:
    local = local_tensor(t)
    return local.numel() * local.element_size()


def as_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of the whole value (a loss computed on tensor-parallel parts is a DTensor)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by name, a tied one once (under its first name), as detached aliases: loading into
    them loads into the model."""
    return {name: p.detach() for name, p in model.named_parameters()}


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA peak allocated on a GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Plan:
    """`none`: every rank holds everything; gradients are allreduced in buckets (GradSync)."""

    mode = "none"
    tp = 1
    sequence_parallel = False
    pp = 1
    virtual_stages = 1  # pipeline stages per pp rank

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

    def __init__(self, model, optimizer, comm: Communicator, bucket_mb: float):
        self.model, self.optimizer, self.comm = model, optimizer, comm
        self.gsync = GradSync(list(model.parameters()), comm, bucket_mb)

    @property
    def comm_wait_s(self) -> float:
        return self.gsync.comm_wait_s

    @comm_wait_s.setter
    def comm_wait_s(self, v: float) -> None:
        self.gsync.comm_wait_s = v

    def no_sync(self):
        return self.gsync.no_sync()

    def finish(self) -> None:
        self.gsync.finish()

    def clip_grad_norm(self, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def step(self) -> None:
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

    def state_dict(self) -> dict:
        return {"model": model_state(self.model),
                "optim": {n: self._optim_entry(p) for n, p in self.model.named_parameters()}}

    def load_state_dict(self, state: dict) -> None:
        """After an in-place load into a tree from `state_dict()`: adopt its optimizer tensors."""
        for name, p in self.model.named_parameters():
            self.optimizer.state[p] = state["optim"][name]

    # -- memory --------------------------------------------------------------------------------
    def grads_bytes(self) -> int:
        if self.gsync.buckets:
            return sum(b.buffer.numel() * b.buffer.element_size() for b in self.gsync.buckets)
        return sum(tensor_bytes(p) for p in self.model.parameters() if p.requires_grad)

    def memory(self) -> dict[str, int]:
        """Bytes on this rank: parameters, gradients (and the buffers they are reduced in), optimizer
        state, and the peak of the process (CUDA peak allocated, or peak RSS on CPU)."""
        optim = sum(tensor_bytes(t) for st in self.optimizer.state.values() for t in st.values()
                    if torch.is_tensor(t))
        return {"params_bytes": sum(tensor_bytes(p) for p in self.model.parameters()),
                "grads_bytes": self.grads_bytes(), "optimizer_bytes": optim,
                "peak_bytes": peak_memory_bytes(self.comm.device)}


class Zero1Plan(Plan):
    """`optimizer`: ZeRO-1 (hpcllm.parallel.zero) — the optimizer state and step are 1/N per rank."""

    mode = "optimizer"

    def __init__(self, model, optimizer, comm: Communicator, bucket_mb: float):
        from hpcllm.parallel.zero import Zero1

        self.model, self.comm = model, comm
        self.gsync = self.zero = Zero1(model, comm, bucket_mb, optimizer)
        self.optimizer = self.zero.optimizer
        self._mesh = None  # the DeviceMesh of the checkpoint's DTensors, made at the first checkpoint

    def clip_grad_norm(self, max_norm: float) -> None:
        self.zero.clip_grad_norm(max_norm)

    def step(self) -> None:
        self.zero.step()

    def grads_bytes(self) -> int:
        return super().grads_bytes() + self.zero.communication_bytes()

    def state_dict(self) -> dict:
        from torch.distributed.tensor import Shard

        if self._mesh is None:
            self._mesh = device_mesh(self.comm)
        return {"model": model_state(self.model),
                "optim": sharded_optim_state(self.zero, self.model, lambda p: (self._mesh, [Shard(0)]))}

    def load_state_dict(self, state: dict) -> None:
        adopt_sharded_optim_state(self.zero, self.model, state)


def sharded_optim_state(zero, model, layout) -> dict:
    """A ZeRO-1's optimizer state by parameter name: each moment this rank's rows of it as a DTensor
    of the whole parameter — `layout(p)` gives its (mesh, placements): Shard(0) over the ranks of
    the ZeRO-1, with a tensor-parallel parameter's own placement beside it — for DCP to reshard."""
    from torch.distributed.tensor import DTensor

    optim = {}
    for name, p in model.named_parameters():
        piece = zero.pieces[p]
        st = zero.local_state(piece)
        if not st:  # before the first step: zeros to load into (AdamW's own initial state)
            rows = (piece.hi - piece.lo,) + tuple(piece.local.shape[1:])
            st = {"step": torch.zeros((), dtype=torch.float32),
                  "exp_avg": torch.zeros(rows, dtype=piece.local.dtype, device=piece.local.device),
                  "exp_avg_sq": torch.zeros(rows, dtype=piece.local.dtype, device=piece.local.device)}
        mesh, placements = layout(p)
        optim[name] = {"step": st["step"], **{
            k: DTensor.from_local(st[k], mesh, placements, run_check=False, shape=p.shape, stride=p.stride())
            for k in ("exp_avg", "exp_avg_sq")}}
    return optim


def adopt_sharded_optim_state(zero, model, state: dict) -> None:
    """After an in-place load into a tree from `sharded_optim_state`: its rows become the state of
    this rank's shards."""
    for name, p in model.named_parameters():
        piece = zero.pieces[p]
        if piece.shard is not None:
            st = state["optim"][name]
            zero.optimizer.state[piece.shard] = {"step": st["step"], "exp_avg": st["exp_avg"].to_local(),
                                                 "exp_avg_sq": st["exp_avg_sq"].to_local()}


class FsdpPlan(Plan):
    """`full`: FSDP2 (`fully_shard` per block, then the root) — parameters, gradients and optimizer
    state are DTensors sharded on dim 0; parameters are all-gathered per block for forward and
    backward and gradients reduce-scattered (fp32 reduction; bf16 parameters under train.dtype bf16)."""

    mode = "full"
    comm_wait_s = 0.0  # FSDP2's collectives are waited on inside forward/backward: not measured apart

    def __init__(self, model, make_optimizer, comm: Communicator, bf16: bool, mesh=None):
        fully_shard_blocks(model, mesh if mesh is not None else device_mesh(comm), bf16)
        self.model, self.comm = model, comm
        self.optimizer = make_optimizer(model)

    @contextlib.contextmanager
    def no_sync(self):
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def finish(self) -> None:
        pass

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def same_start(self) -> None:
        pass  # every rank filled its part from the same whole values (hpcllm.parallel.materialize)

    def grads_bytes(self) -> int:
        return sum(tensor_bytes(p) for p in self.model.parameters() if p.requires_grad)  # sharded, as held


def fully_shard_blocks(model, mesh, bf16: bool) -> None:
    """FSDP2 over `mesh`: each of `model.blocks()` its own unit, then `model` (what is left: the
    embedding, the final norm and the head) — fp32 reduction; bf16 parameters under train.dtype bf16."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for block in model.blocks():
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def device_mesh(comm: Communicator, tp: int = 1, pp: int = 1, *, named: bool = False):
    """The DeviceMesh of the job on torch.distributed (created beside the job's own backend when that
    is mpi or horovod: gloo on CPU): 1-D over every rank, (dp, tp) with tp > 1, or (pp, dp, tp) with
    pp > 1 — tp innermost, so the ranks of a tp group are adjacent (they share a node and its fast
    links), pp outermost: rank = (pp_rank x dp + dp_rank) x tp + tp_rank. `named`: the (dp, tp) mesh
    even at tp=1, for the tensor-parallel path on groups of one rank (inference at tp=1, the bench's
    DTensor-overhead figure)."""
    from torch.distributed.device_mesh import init_device_mesh

    from hpcllm.comm.torch_group import ensure_process_group

    ensure_process_group(comm)
    if pp > 1:
        return init_device_mesh(comm.device.type, (pp, comm.size // (pp * tp), tp), mesh_dim_names=("pp", "dp", "tp"))
    if tp == 1 and not named:
        return init_device_mesh(comm.device.type, (comm.size,))
    return init_device_mesh(comm.device.type, (comm.size // tp, tp), mesh_dim_names=("dp", "tp"))


def build_plan(mode: str, model, comm: Communicator, *, make_optimizer, bucket_mb: float, bf16: bool,
               tp: int = 1, vocab_parallel: bool = True, sequence_parallel: bool = False, pp: int = 1,
               pp_schedule: str = "1f1b", pp_virtual_stages: int = 1) -> Plan:
    """The plan for parallel.shard=`mode` (and parallel.tp, parallel.pp). With one rank every mode
    holds everything: `none`."""
    if mode not in MODES:
        raise ValueError(f"parallel.shard must be one of {MODES}, got {mode!r}")
    if pp > 1:
        from hpcllm.parallel.pipeline import PipelinePlan

        return PipelinePlan(model, make_optimizer, comm, device_mesh(comm, tp, pp), schedule=pp_schedule,
                            mode=mode, bucket_mb=bucket_mb, bf16=bf16, vocab_parallel=vocab_parallel,
                            sequence_parallel=sequence_parallel, virtual_stages=pp_virtual_stages)
    if tp > 1:
        from hpcllm.parallel.tensor import TensorParallelPlan

        return TensorParallelPlan(model, make_optimizer, comm, device_mesh(comm, tp), vocab_parallel=vocab_parallel,
                                  mode=mode, bucket_mb=bucket_mb, bf16=bf16, sequence_parallel=sequence_parallel)
    if comm.size == 1 or mode == "none":
        return Plan(model, make_optimizer(model), comm, bucket_mb)
    if mode == "optimizer":
        return Zero1Plan(model, make_optimizer(model), comm, bucket_mb)
    return FsdpPlan(model, make_optimizer, comm, bf16)
