"""The training job, top to bottom: `train(spec, comm)`.

    setup   the layout (hpcllm.parallel.layout), dataset, model (fresh, HF weights, or the latest
            checkpoint) parallelized by the layout with its plan and optimizer (`build_training`:
            hpcllm.parallel.parallelize, .build); a resumed run loads the checkpoint on however many
            ranks it has now
    loop    for each step: the micro-steps of the global batch through the plan's forward_backward
            (communication only on the last; a pipeline runs them through its stages),
            one small allreduce of [stop requested, loss not finite], clip, AdamW step; log, eval,
            checkpoint (every rank writes its part)
    end     final checkpoint; a stop request (signal, time limit) ends with EXIT_REQUEUE
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from typing import NamedTuple

import torch

from hpcllm.config import JobSpec
from hpcllm.data import TokenLoader, open_dataset
from hpcllm.comm import Communicator
from hpcllm.errors import EXIT_REQUEUE, ConfigError, TrainingError
from hpcllm import model as models
from hpcllm.model.base import CausalLM
from hpcllm import monitor
from hpcllm.model.fit import check_fits
from hpcllm.checkpoint import latest_checkpoint
from hpcllm.parallel.build import build_plan
from hpcllm.parallel.estimate import estimate_memory
from hpcllm.parallel.layout import Layout, check_model
from hpcllm.parallel.materialize import held_bytes, materialize
from hpcllm.parallel.parallelize import parallelize
from hpcllm.parallel.plans import Plan
from hpcllm.train.checkpointer import Checkpointer
from hpcllm.train.config import TrainConfig
from hpcllm.train.metrics import MetricsLog, cpu_seconds, device_peak
from hpcllm.train.schedule import lr_at
from hpcllm.train.signals import StopRequest
from hpcllm.train.stragglers import StragglerWatch, gather, injected_delay

log = logging.getLogger("hpcllm.train")


@dataclasses.dataclass
class TrainResult:
    step: int
    stopped: str | None  # why the run stopped early (then exit status EXIT_REQUEUE), or None
    last_loss: float | None
    val_loss: float | None
    checkpoint: str | None

    @property
    def exit_code(self) -> int:
        return EXIT_REQUEUE if self.stopped else 0


def build_model(spec: JobSpec, vocab_size: int, device, tokenizer_id: str | None = None,
                dataset: str = "the dataset", *, on_meta: bool = False, bytes_per_param: float = 16.0,
                ranks_on_node: int = 1) -> CausalLM:
    """The model to train, whatever its family: from `model.init` (an HF directory: its config.json
    says what it is, its tokenizer.json must be the data's) or fresh from the spec's `model`
    section, initialised from train.seed. `on_meta`: shapes only, no storage and no weights read —
    the plan shards it, then hpcllm.parallel.materialize gives each rank its part. `bytes_per_param`:
    what the plan keeps per parameter on this rank (weights, gradients, AdamW state), checked against
    its memory before anything is allocated."""
    fits = dict(bytes_per_param=bytes_per_param, device=device, ranks_on_node=ranks_on_node,
                what="weights, gradients and AdamW state")
    if spec.model.init:
        from hpcllm.data.tokenizer import check_model_tokenizer
        from hpcllm.model.hf import hf_model_on_meta, load_hf_model, model_dir, read_config

        if tokenizer_id is not None:
            check_model_tokenizer(spec.model.init, tokenizer_id, dataset)
        check_fits(read_config(spec.model.init)[1], source=f"{model_dir(spec.model.init)}/config.json", **fits)
        if on_meta:
            model, _ = hf_model_on_meta(spec.model.init, dropout=spec.model.dropout)
        else:
            model, _ = load_hf_model(spec.model.init, dropout=spec.model.dropout)
        if vocab_size > model.config.vocab_size:
            raise TrainingError(f"vocabulary mismatch: {dataset}'s tokenizer has {vocab_size} tokens, more than "
                                f"model.init's config.json vocab_size={model.config.vocab_size} ({spec.model.init}): "
                                "prepare the data with the model's tokenizer (data.tokenizer: the model directory)")
    else:
        try:
            cfg = spec.model.resolve(vocab_size)
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
        if cfg.vocab_size != vocab_size:
            raise TrainingError(f"model.vocab_size={cfg.vocab_size} but the dataset's tokenizer has {vocab_size}")
        check_fits(cfg, source="the spec's model section", **fits)
        if on_meta:
            model = models.build_model_on_meta(cfg)
        else:
            model = models.build_model(cfg).init_weights(spec.train.seed)
    if spec.train.seq_len > model.config.block_size:
        raise TrainingError(f"train.seq_len={spec.train.seq_len} exceeds the model context ({model.config.block_size})")
    return model if on_meta else model.to(device)


def uses_bf16(device, dtype_cfg: str) -> bool:
    return dtype_cfg == "bf16" or (dtype_cfg == "auto" and device.type == "cuda")


def autocast_for(device, dtype_cfg: str):
    """train.dtype as a context: bf16 autocast (asked for, or `auto` on a GPU), else nothing."""
    if uses_bf16(device, dtype_cfg):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class TrainStep:
    """One optimizer step: `accum` micro-steps (the plan's forward_backward: gradients communicated
    on the last one only), one small allreduce in which the ranks agree on [a stop was requested,
    the loss is not finite], clipping, AdamW — through the parallel plan, whatever the mode. `train`
    runs it every step, and `hpcllm bench train` times exactly this."""

    def __init__(self, model: CausalLM, plan: Plan, comm: Communicator, tc: TrainConfig, accum: int | None = None):
        self.model, self.plan, self.comm, self.tc = model, plan, comm, tc
        self.accum = accum or tc.accumulation(comm.size)
        self.fwd = torch.compile(model) if tc.compile else model
        self.t_data = self.t_compute = 0.0  # seconds waiting for batches, in forward/backward
        self.slow_s = injected_delay(comm.rank)  # the straggler tests' hook (hpcllm.train.stragglers), else 0

    def __call__(self, next_batch, step: int, stop_code: int) -> tuple[torch.Tensor, int]:
        """Run step number `step` (1-based, as logged and checkpointed) with this rank's stop request
        (StopRequest.code(): 0 for none); returns its mean loss and the ranks' agreed stop code (0:
        go on) — the largest, so every rank names the same reason."""
        tc, device, plan = self.tc, self.comm.device, self.plan
        waited = 0.0

        def timed_batch():
            nonlocal waited
            t0 = time.perf_counter()
            with self.comm.waiting("the data loader (next training batch)"):
                batch = next_batch()
            waited += time.perf_counter() - t0
            return batch

        t0 = time.perf_counter()
        step_loss = plan.forward_backward(self.fwd, timed_batch, self.accum, lambda: autocast_for(device, tc.dtype))
        if self.slow_s:
            time.sleep(self.slow_s)
        self.t_data += waited
        self.t_compute += time.perf_counter() - t0 - waited
        plan.finish()
        # built on the device and read back once: one host-device synchronisation per step
        flags = torch.stack([torch.full((), float(stop_code), device=device), (~torch.isfinite(step_loss)).float()])
        self.comm.allreduce(flags, "max")
        code, not_finite = flags.tolist()  # (one read-back)
        stop_agreed, not_finite = int(code), not_finite > 0
        if not_finite:
            if tc.nan_policy == "abort":
                raise TrainingError(f"loss is not finite at step {step} (on at least one rank); no checkpoint "
                                    f"written after step {step - 1}. train.nan_policy=skip skips such steps instead")
            log.warning("step %d: non-finite loss, step skipped", step)
        else:
            if tc.grad_clip > 0:
                plan.clip_grad_norm(tc.grad_clip)
            plan.step()
        plan.zero_grad()
        return step_loss, stop_agreed


class LossWindow:
    """The loss summed over the steps since the last log line, on this rank. Checkpoints keep every
    rank's partial sum, so a run resumed between two log lines logs exactly the numbers an
    uninterrupted run logs (the mean over the whole interval, not over the steps since the restart)."""

    def __init__(self, comm: Communicator):
        self.comm = comm
        self.sum = torch.zeros((), device=comm.device)
        self.steps = 0

    def add(self, loss: torch.Tensor) -> None:
        self.sum += loss
        self.steps += 1

    def mean(self) -> float:
        """The mean over the window and over the ranks (a collective); starts the next window."""
        self.comm.allreduce(self.sum, "avg")
        value = self.sum.item() / self.steps
        self.sum.zero_()
        self.steps = 0
        return value

    def state_dict(self) -> dict:
        """Every rank's sum (a collective)."""
        return {"sums": self.comm.allgather_object(float(self.sum.item())), "steps": self.steps}

    def load_state_dict(self, state: dict | None) -> None:
        if not state:
            return
        if len(state["sums"]) == self.comm.size:  # fp32 -> float -> fp32 is exact
            self.sum.fill_(state["sums"][self.comm.rank])
        else:  # written on another number of ranks: each rank carries the mean, so the ranks' mean is it
            self.sum.fill_(sum(state["sums"]) / len(state["sums"]))
        self.steps = int(state["steps"])


class Built(NamedTuple):
    """What `build_training` gives the loop: the model (this rank's part of it), its optimizer and
    plan, and the figures of the whole model it logs."""

    model: CausalLM
    optimizer: torch.optim.Optimizer
    plan: Plan
    estimate: dict[str, int]  # `hpcllm plan`'s memory estimate per rank, logged beside the measured figures
    n_params: int
    flops_per_token: float


def training_layout(spec: JobSpec, comm: Communicator) -> tuple[Layout, int]:
    """The layout on this run's ranks and the micro-batches per step (a pipeline's micro-batches are
    the accumulation steps), or the ConfigError naming the field."""
    try:
        layout = spec.parallel.layout(comm.size)
        _, accum = spec.parallel.micro_batches(spec.train, comm.size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return layout, accum


def seed_rank(seed: int, layout: Layout, rank: int) -> None:
    """The random stream of this rank: train.seed on every rank, unless the ranks of a tp group hold
    different positions (sequence parallel), whose dropout then needs a stream per rank."""
    torch.manual_seed(seed)
    if layout.sp_enabled:
        torch.manual_seed(hash((seed, rank)) % 2**63)


def build_training(spec: JobSpec, comm: Communicator, layout: Layout, ds, fresh: bool) -> Built:
    """The model built (on the meta device where the layout splits the parameters: no rank ever holds
    the whole model), parallelized by the layout, given its parts (filled fresh or from model.init;
    with `fresh` false a checkpoint is loaded into them after), then its optimizer and plan."""
    tc, device = spec.train, comm.device
    on_meta = layout.builds_on_meta
    model = build_model(spec, ds.vocab_size, device, ds.tokenizer_id, str(ds.path), on_meta=on_meta,
                        bytes_per_param=layout.bytes_per_param(), ranks_on_node=comm.world.local_size)
    try:
        check_model(spec.parallel, model.config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    # of the whole model, before the pipeline cut keeps only this rank's stages
    estimate = estimate_memory(model, layout.shard if comm.size > 1 else "none", layout.tp, layout.dp, layout.pp,
                               virtual_stages=layout.virtual_stages)
    n_params, flops_per_token = model.num_params(), model.estimate_flops_per_token(tc.seq_len)
    parallel = parallelize(model, layout, comm, bf16=uses_bf16(device, tc.dtype),
                           activation_checkpointing=tc.activation_checkpointing)
    if on_meta:
        fill = {} if not fresh else {"hf_dir": spec.model.init} if spec.model.init else {"seed": tc.seed}
        materialize(model, device, whole=parallel.whole, **fill)
        held, total = held_bytes(model)
        if parallel.whole is not None:  # a pipeline stage: of the whole model, not of the stage
            total = held_bytes(parallel.whole)[1]
        log.info("model built on the meta device and sharded before materialising: this rank holds %s of the "
                 "model's %s", _mb(held), _mb(total))
    # tensor parallel: AdamW one parameter at a time (its multi-tensor kernels refuse DTensor and
    # plain tensors in one list; the norms stay plain)
    multi_tensor = None if not layout.tp_enabled else False
    fused = device.type == "cuda" and not layout.tp_enabled
    plan = build_plan(parallel, layout, comm, bucket_mb=spec.dist.bucket_mb,
                      make_optimizer=lambda m: m.configure_optimizer(tc.weight_decay, tc.lr, tuple(tc.betas),
                                                                     fused=fused, foreach=multi_tensor))
    return Built(model, plan.optimizer, plan, estimate, n_params, flops_per_token)


def train(spec: JobSpec, comm: Communicator, start_id: str | None = None) -> TrainResult:
    """`start_id`: the job start's id (hpcllm.provenance), which metrics.jsonl's records name."""
    tc, device = spec.train, comm.device
    layout, accum = training_layout(spec, comm)
    seed_rank(tc.seed, layout, comm.rank)
    global_batch = tc.batch_size * accum * layout.dp
    ds = open_dataset(spec.data.dataset)
    ckpt = latest_checkpoint(spec.run_dir, warn=comm.rank == 0) if tc.resume else None
    model, optimizer, plan, estimate, n_params, flops_per_token = build_training(spec, comm, layout, ds,
                                                                                  fresh=ckpt is None)
    loader = TokenLoader(ds, "train", seq_len=tc.seq_len, batch_size=tc.batch_size, rank=layout.dp_rank(comm.rank),
                         world_size=layout.dp, seed=tc.seed, device=device, global_batch=global_batch)
    has_val = tc.eval_interval > 0 and "val" in ds.splits
    metrics = MetricsLog(spec.run_dir, comm.rank == 0, tensorboard=spec.metrics.tensorboard, start_id=start_id)

    step = 0
    window = LossWindow(comm)
    # what a checkpoint holds, from its owners: the plan's tensors, the loader's position, the log window
    checkpointer = Checkpointer(spec, comm, layout, plan, global_batch, loader=loader, log_window=window)
    if ckpt is not None:
        step = checkpointer.resume(ckpt)
        metrics.truncate_after(step)
    else:
        plan.same_start()
    run_step = TrainStep(model, plan, comm, tc, accum)
    mon = monitor.current()  # live Prometheus metrics (hpcllm.monitor): no-ops unless configured
    mon.train_started(tc.max_steps, step)
    stragglers = StragglerWatch(tc.stragglers.threshold, tc.stragglers.steps, leader=comm.rank == 0)

    stop = StopRequest(tc.end_time_margin_s).install()
    tokens_per_step = global_batch * tc.seq_len
    dev_name, peak = device_peak(device)
    log.info("model %.2fM params, %d tokens/step (%d sequences: %d data-parallel rank(s) x batch %d x %d "
             "micro-step(s)), parallel.shard=%s %s, device %s%s", n_params / 1e6, tokens_per_step, global_batch,
             layout.dp, tc.batch_size, accum, plan.mode, layout.describe(), dev_name,
             "" if peak else " (peak FLOP/s unknown: no MFU)")
    bar = None
    if comm.rank == 0 and tc.progress:
        from tqdm import tqdm

        bar = tqdm(total=tc.max_steps, initial=step, unit="step", desc="train", mininterval=1.0)

    last_loss = val_loss = None
    plan.comm_wait_s = 0.0
    t_log = time.perf_counter()
    steps_timed = 0  # steps of this process since t_log (a resumed window has fewer than window.steps)
    stopped = None
    model.train()
    try:
        while step < tc.max_steps:
            lr = lr_at(step, tc.lr, tc.min_lr, tc.warmup_steps, tc.max_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            step_loss, stop_agreed = run_step(loader.next_batch, step + 1, stop.code())
            step += 1
            checkpointer.poll()
            steps_timed += 1
            mon.train_step(step)
            window.add(step_loss)
            if bar is not None:
                bar.update(1)

            if step % tc.log_interval == 0 or step == tc.max_steps:
                last_loss = window.mean()
                dt = time.perf_counter() - t_log
                tps = tokens_per_step * steps_timed / dt
                ranks = gather(comm, cpu_seconds(), run_step.t_data + run_step.t_compute)  # every rank's
                rec = dict(step=step, loss=last_loss, lr=lr, tokens_per_s=tps, dt_s=dt,
                           mfu=(flops_per_token * tps / (peak * comm.size)) if peak else None,
                           t_data_s=run_step.t_data, t_compute_s=run_step.t_compute, t_comm_s=plan.comm_wait_s,
                           cpu_s_ranks=[r.cpu_s for r in ranks], **stragglers.check(step, steps_timed, ranks),
                           **({"ckpt_s": ckpt_s} if (ckpt_s := checkpointer.take_stalls()) else {}),
                           **plan.memory())
                if has_val and (step % tc.eval_interval == 0 or step == tc.max_steps):
                    rec["val_loss"] = val_loss = evaluate(model, ds, spec, comm, plan)
                metrics.write(rec)
                mon.train_logged(comm, rec, run_step.t_data, run_step.t_compute, plan.comm_wait_s, steps_timed)
                if bar is not None:
                    bar.set_postfix(loss=f"{last_loss:.3f}", **({"val": f"{val_loss:.3f}"} if "val_loss" in rec else {}))
                else:
                    log.info("step %d loss %.4f%s lr %.2e %.0f tok/s", step, last_loss,
                             f" val {rec['val_loss']:.4f}" if "val_loss" in rec else "", lr, tps)
                steps_timed = 0
                run_step.t_data = run_step.t_compute = plan.comm_wait_s = 0.0
                t_log = time.perf_counter()

            if stop_agreed:
                stopped = stop.describe(stop_agreed)
                break
            if tc.ckpt_interval and step % tc.ckpt_interval == 0 and step < tc.max_steps:
                checkpointer.save(step)
    except BaseException:
        checkpointer.close()
        raise
    finally:
        stop.uninstall()
        loader.close()
        if bar is not None:
            bar.close()

    # the last step's checkpoint, unless it is the one resumed from or just saved (then this waits for it)
    if checkpointer.wait() is None or checkpointer.last_saved.name != f"step_{step:08d}":
        checkpointer.save(step)
    path = checkpointer.wait()
    mem = plan.memory()
    log.info("memory per rank (parallel.shard=%s tp=%d pp=%d; measured, `hpcllm plan`'s estimate in brackets): "
             "parameters %s, gradients %s, optimizer state %s, peak %s %s", plan.mode, plan.tp, plan.pp,
             *(f"{_mb(mem[k])} [{_mb(estimate[k])}]" for k in ("params_bytes", "grads_bytes", "optimizer_bytes")),
             _mb(mem["peak_bytes"]), "CUDA allocated" if device.type == "cuda" else "RSS")
    if stopped:
        log.warning("stopping at step %d (%s): checkpoint %s; exit %d so the job can be requeued", step, stopped,
                    path, EXIT_REQUEUE)
    else:
        log.info("done: %d steps, loss %s, val loss %s, checkpoint %s", step,
                 f"{last_loss:.4f}" if last_loss is not None else "-",
                 f"{val_loss:.4f}" if val_loss is not None else "-", path)
    return TrainResult(step, stopped, last_loss, val_loss, str(path) if path else None)


@torch.no_grad()
def evaluate(model: CausalLM, ds, spec: JobSpec, comm: Communicator, plan: Plan) -> float:
    tc = spec.train
    model.eval()
    layout = spec.parallel.layout(comm.size)
    ld = TokenLoader(ds, "val", seq_len=tc.seq_len, batch_size=tc.batch_size, rank=layout.dp_rank(comm.rank),
                     world_size=layout.dp, seed=tc.seed, mode="sequential", device=comm.device, prefetch=0)
    n_batches = min(tc.eval_batches, ld.steps_per_epoch)
    # [loss sum, batches] on this rank: the ranks of a tp group or a pipeline hold the same pair
    total = plan.eval_losses(list(ld.batches(n_batches)), lambda: autocast_for(comm.device, tc.dtype))
    comm.allreduce(total, "sum")
    model.train()
    return (total[0] / total[1]).item() if total[1] > 0 else math.nan


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"
