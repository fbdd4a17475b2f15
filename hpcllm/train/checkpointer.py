"""A training run's state in and out of checkpoints, gathered from the objects that own it.

    ckpt = Checkpointer(spec, comm, layout, plan, loader=loader, log_window=window)
    step = ckpt.resume(path)        # every owner loads its part; returns the step
    ckpt.save(step)                 # every owner gives its part (a collective)
    ckpt.poll()                     # each step: a background save that is done becomes visible
    ckpt.wait()                     # before stopping: the save in flight is finished

Each owner says what it keeps (`state_dict()`, `load_state_dict(state)`, as torch's Stateful):
the plan its model and optimizer tensors (every rank its part, hpcllm.checkpoint.sharded), the
others plain values that rank 0 keeps in state.pt under the owner's name. The checkpointer adds
only what describes the run itself (world size, global batch) and checks a resume against it.

`train.async_checkpoint`: the tensors are copied to host memory (the training stalls only for
that) and written by PyTorch DCP's async save in a background thread, over a process group of its
own so its collectives never interleave with the training's. At most one save is in flight; the
checkpoint directory is renamed into place by rank 0 only once DCP's coordinator has gathered
every rank's write, so a kill during the write leaves a `.tmp` directory, never a checkpoint that
looks complete.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Protocol

import torch

from hpcllm import monitor
from hpcllm.checkpoint import is_legacy, read_meta, read_state, save_checkpoint
from hpcllm.config import JobSpec, to_dict
from hpcllm.errors import CheckpointError, TrainingError
from hpcllm.parallel.layout import Layout
from hpcllm.parallel.plans import Plan

log = logging.getLogger("hpcllm.train")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Checkpointer:
    def __init__(self, spec: JobSpec, comm, layout: Layout, plan: Plan, global_batch: int, **owners: Stateful):
        self.spec, self.comm, self.layout, self.plan, self.global_batch = spec, comm, layout, plan, global_batch
        self.owners = owners
        self.async_save = spec.train.async_checkpoint
        self.pending = None  # the background save in flight (hpcllm.checkpoint.sharded.PendingSave)
        self.last_saved: Path | None = None
        # seconds the loop stood still for each checkpoint since the last log line (metrics.jsonl's
        # ckpt_s; the checkpoint-interval advice's save time): the whole save, or a background save's
        # copy plus any wait for it
        self.stalls: list[float] = []

    # -- save ------------------------------------------------------------------------------------

    def save(self, step: int) -> Path:
        """Write step `step` on every rank (a collective). Synchronous: the checkpoint is complete when
        this returns. Asynchronous: the previous save is finished first (at most one in flight), the
        state is copied and written in the background; `poll` or `wait` makes it visible."""
        t0 = time.perf_counter()
        if self.pending is not None:
            self.pending.wait()
            self._finish()
        # what describes the run, then each owner's part (log_window's is a collective: every rank)
        global_state = {name: owner.state_dict() for name, owner in self.owners.items()}
        global_state.update(world_size=self.comm.size, global_batch=self.global_batch)
        plan = self.plan
        meta = {"spec": to_dict(self.spec), "model": to_dict(plan.model.config), "world_size": self.comm.size,
                "shard": plan.mode, "tp": plan.tp, "pp": plan.pp, "pp_virtual_stages": plan.virtual_stages}
        tc = self.spec.train
        result = save_checkpoint(self.spec.run_dir, step, self.comm, plan.state_dict(), global_state, meta,
                                 tc.keep_checkpoints, background=self.async_save)
        stalled = time.perf_counter() - t0
        self.stalls.append(stalled)
        if self.async_save:
            self.pending = result
            self.pending.stalled_s = stalled
            return result.final
        self._saved(result, step, stalled, stalled)
        return result

    def poll(self) -> None:
        """Finish the save in flight if its writes are done (cheap: no collective, no wait)."""
        if self.pending is not None and self.pending.done():
            self._finish()

    def wait(self) -> Path | None:
        """Wait for the save in flight, then make it visible; returns the latest checkpoint written."""
        if self.pending is not None:
            t0 = time.perf_counter()
            self.pending.wait()
            if self.stalls:  # the wait is part of the last checkpoint's cost
                self.stalls[-1] += time.perf_counter() - t0
            self._finish()
        return self.last_saved

    def _finish(self) -> None:
        pending, self.pending = self.pending, None
        path = pending.finish()  # raises CheckpointError if the background write failed
        self._saved(path, pending.step, pending.stalled_s, time.perf_counter() - pending.started)

    def _saved(self, path: Path, step: int, stalled: float, total: float) -> None:
        self.last_saved = path
        if self.comm.rank == 0:
            if self.async_save:
                log.info("checkpoint %s (written in the background in %.2f s; training stalled %.2f s)", path,
                         total, stalled)
            else:
                log.info("checkpoint %s", path)
        monitor.current().checkpointed(step, total)

    def take_stalls(self) -> list[float]:
        """The stall of each checkpoint since the last call (metrics.jsonl's ckpt_s)."""
        s, self.stalls = self.stalls, []
        return s

    def close(self) -> None:
        """After an error: a save in flight is left to end on its own (its directory stays .tmp)."""
        if self.pending is not None:
            self.pending.abandon()
            self.pending = None

    # -- resume ----------------------------------------------------------------------------------

    def resume(self, ckpt: Path) -> int:
        """Load `ckpt` on this run's ranks (any number, any sharding mode) into every owner; returns its step."""
        spec, comm, layout, plan = self.spec, self.comm, self.layout, self.plan
        if is_legacy(ckpt):
            raise CheckpointError(f"{ckpt}: written by an earlier hpcllm (one model.safetensors for every rank), "
                                  f"which can be exported and served but not resumed: `hpcllm export {spec.run_dir} "
                                  "DIR`, then train in a new run_dir with model.init=DIR")
        from hpcllm.checkpoint.sharded import check_fits, load_sharded, restore_rank_rng

        state = read_state(ckpt / "state.pt")
        tree = plan.state_dict()
        check_fits(ckpt, tree)  # another model first: that is what a changed model.* means
        old_ranks, old_batch = state.get("world_size"), state.get("global_batch")
        if old_batch != self.global_batch:
            dp = layout.dp  # the ranks of a tp group or a pipeline share their batches
            raise TrainingError(
                f"{ckpt}: written with a global batch of {old_batch} sequences per step ({old_ranks} rank(s)); this "
                f"run has {self.global_batch} ({dp} data-parallel rank(s) x train.batch_size={spec.train.batch_size} "
                f"x {self.global_batch // (dp * spec.train.batch_size)} micro-step(s)): set "
                f"train.global_batch_size={old_batch} to resume it on {comm.size} rank(s)")
        load_sharded(ckpt, comm, tree)
        plan.load_state_dict(tree)
        for name, owner in self.owners.items():
            if name not in state:
                raise CheckpointError(f"{ckpt / 'state.pt'}: no '{name}' state — not a training checkpoint of "
                                      "this hpcllm")
            owner.load_state_dict(state[name])
        step = int(state["step"])
        if old_ranks == comm.size:
            restore_rank_rng(ckpt, comm.rank)
        else:  # no rank continues another's stream: a fresh one per (seed, step, data-parallel rank), the
            # same on the ranks of a tensor-parallel group (their dropout masks must agree) unless they
            # hold different positions (sequence parallel)
            torch.manual_seed(hash((spec.train.seed, step, layout.rng_stream(comm.rank))) % 2**63)
        self._log_change(ckpt, step, old_ranks)
        self.last_saved = ckpt
        return step

    def _log_change(self, ckpt: Path, step: int, old_ranks) -> None:
        plan, comm = self.plan, self.comm
        meta = read_meta(ckpt)
        old_mode, old_tp, old_pp = meta.get("shard", "none"), meta.get("tp", 1), meta.get("pp", 1)
        old_stages, new_stages = (old_pp, meta.get("pp_virtual_stages", 1)), (plan.pp, plan.virtual_stages)
        if old_ranks != comm.size or old_mode != plan.mode or old_tp != plan.tp or old_stages != new_stages:
            log.info("resumed step %d from %s rank(s) on %d rank(s) (parallel.shard %s -> %s)%s%s: %s", step,
                     old_ranks, comm.size, old_mode, plan.mode,
                     f" (parallel.tp {old_tp} -> {plan.tp})" if old_tp != plan.tp else "",
                     f" (parallel.pp {_pp_label(*old_stages)} -> {_pp_label(*new_stages)})"
                     if old_stages != new_stages else "", ckpt)
        log.info("resumed from %s (step %d)", ckpt, step)


def _pp_label(pp: int, virtual_stages: int) -> str:
    return f"{pp} x {virtual_stages} stages per rank" if virtual_stages > 1 else str(pp)
