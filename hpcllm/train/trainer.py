"""The training job, top to bottom: `train(spec, comm)`.

    setup   dataset, model (fresh, HF weights, or the latest checkpoint), optimizer, gradient sync;
            every rank starts from rank 0's parameters (and optimizer state, on resume)
    loop    for each step: grad_accum micro-steps (communication only on the last), one small
            allreduce of [stop requested, loss not finite], clip, AdamW step; log, eval, checkpoint
    end     final checkpoint; a stop request (signal, time limit) ends with EXIT_REQUEUE
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time

import torch

from hpcllm.config import JobSpec, to_dict
from hpcllm.data import TokenLoader, open_dataset
from hpcllm.comm import Communicator
from hpcllm.errors import EXIT_REQUEUE, ConfigError, TrainingError
from hpcllm.model import build_model as new_model
from hpcllm.model.base import CausalLM
from hpcllm.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from hpcllm.train.config import TrainConfig
from hpcllm.train.grad_sync import GradSync
from hpcllm.train.metrics import MetricsLog, device_peak
from hpcllm.train.schedule import lr_at
from hpcllm.train.signals import StopRequest

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
                dataset: str = "the dataset") -> CausalLM:
    """The model to train, whatever its family: from `model.init` (an HF directory: its config.json
    says what it is, its tokenizer.json must be the data's) or fresh from the spec's `model`
    section, initialised from train.seed."""
    if spec.model.init:
        from hpcllm.data.tokenizer import check_model_tokenizer
        from hpcllm.model import load_hf_model

        if tokenizer_id is not None:
            check_model_tokenizer(spec.model.init, tokenizer_id, dataset)
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
        model = new_model(cfg).init_weights(spec.train.seed)
    if spec.train.seq_len > model.config.block_size:
        raise TrainingError(f"train.seq_len={spec.train.seq_len} exceeds the model context ({model.config.block_size})")
    return model.to(device)


def autocast_for(device, dtype_cfg: str):
    """train.dtype as a context: bf16 autocast (asked for, or `auto` on a GPU), else nothing."""
    use_bf16 = dtype_cfg == "bf16" or (dtype_cfg == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class TrainStep:
    """One optimizer step: `grad_accum` micro-steps (gradients communicated on the last one only),
    one small allreduce in which the ranks agree on [a stop was requested, the loss is not finite],
    clipping, AdamW. `train` runs it every step, and `hpcllm bench train` times exactly this."""

    def __init__(self, model: CausalLM, optimizer, gsync: GradSync, comm: Communicator, tc: TrainConfig):
        self.model, self.optimizer, self.gsync, self.comm, self.tc = model, optimizer, gsync, comm, tc
        self.fwd = torch.compile(model) if tc.compile else model
        self.t_data = self.t_compute = 0.0  # seconds waiting for batches, in forward/backward

    def __call__(self, next_batch, step: int, stop_requested: bool) -> tuple[torch.Tensor, bool]:
        """Run step number `step` (1-based, as logged and checkpointed); returns its mean loss and
        whether any rank asked to stop."""
        tc, device, gsync = self.tc, self.comm.device, self.gsync
        step_loss = torch.zeros((), device=device)
        for micro in range(tc.grad_accum):
            t0 = time.perf_counter()
            with self.comm.waiting("the data loader (next training batch)"):
                x, y = next_batch()
            t1 = time.perf_counter()
            last = micro == tc.grad_accum - 1
            with (contextlib.nullcontext() if last else gsync.no_sync()), autocast_for(device, tc.dtype):
                _, loss = self.fwd(x, y)
                (loss / tc.grad_accum).backward()
            step_loss += loss.detach() / tc.grad_accum
            self.t_data += t1 - t0
            self.t_compute += time.perf_counter() - t1
        gsync.finish()
        # built on the device and read back once: one host-device synchronisation per step
        flags = torch.stack([torch.full((), float(stop_requested), device=device),
                             (~torch.isfinite(step_loss)).float()])
        self.comm.allreduce(flags, "max")
        stop_agreed, not_finite = (v > 0 for v in flags.tolist())
        if not_finite:
            if tc.nan_policy == "abort":
                raise TrainingError(f"loss is not finite at step {step} (on at least one rank); no checkpoint "
                                    f"written after step {step - 1}. train.nan_policy=skip skips such steps instead")
            log.warning("step %d: non-finite loss, step skipped", step)
        else:
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
            self.optimizer.step()
        gsync.zero_grad()
        return step_loss, stop_agreed


class LossWindow:
    """The loss summed over the steps since the last log line, on this rank. Checkpoints keep every
    rank's partial sum, so a run resumed between two log lines logs exactly the numbers an
    uninterrupted run logs (the mean over the whole interval, not over the steps since the restart)."""

    def __init__(self, device):
        self.sum = torch.zeros((), device=device)
        self.steps = 0

    def add(self, loss: torch.Tensor) -> None:
        self.sum += loss
        self.steps += 1

    def mean(self, comm: Communicator) -> float:
        """The mean over the window and over the ranks; starts the next window."""
        comm.allreduce(self.sum, "avg")
        value = self.sum.item() / self.steps
        self.sum.zero_()
        self.steps = 0
        return value

    def state(self, comm: Communicator) -> dict:
        return {"sums": comm.allgather_object(float(self.sum.item())), "steps": self.steps}

    def load(self, state: dict | None, comm: Communicator) -> None:
        if state and len(state["sums"]) == comm.size:  # fp32 -> float -> fp32 is exact
            self.sum.fill_(state["sums"][comm.rank])
            self.steps = int(state["steps"])


def train(spec: JobSpec, comm: Communicator) -> TrainResult:
    tc, device = spec.train, comm.device
    torch.manual_seed(tc.seed)
    ds = open_dataset(spec.data.dataset)
    model = build_model(spec, ds.vocab_size, device, ds.tokenizer_id, str(ds.path))
    optimizer = model.configure_optimizer(tc.weight_decay, tc.lr, tuple(tc.betas), fused=device.type == "cuda")
    loader = TokenLoader(ds, "train", seq_len=tc.seq_len, batch_size=tc.batch_size, rank=comm.rank,
                         world_size=comm.size, seed=tc.seed, device=device)
    has_val = tc.eval_interval > 0 and "val" in ds.splits
    gsync = GradSync(list(model.parameters()), comm, spec.dist.bucket_mb)
    metrics = MetricsLog(spec.run_dir, comm.rank == 0)

    step = 0
    window = LossWindow(device)
    ckpt = latest_checkpoint(spec.run_dir) if tc.resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, model)
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise TrainingError(f"{ckpt}/state.pt: the optimizer state does not fit this run ({e}); "
                                "use a new run_dir or train.resume=false") from None
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"])
        step = int(state["step"])
        window.load(state.get("log_window"), comm)
        metrics.truncate_after(step)
        log.info("resumed from %s (step %d)", ckpt, step)
    # identical start on every rank: rank 0's parameters and optimizer state
    opt_tensors = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    gsync.broadcast_parameters(list(model.parameters()) + opt_tensors)
    run_step = TrainStep(model, optimizer, gsync, comm, tc)

    stop = StopRequest(tc.end_time_margin_s).install()
    tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum * comm.size
    dev_name, peak = device_peak(device)
    flops_per_token = model.estimate_flops_per_token(tc.seq_len)
    log.info("model %.2fM params, %d tokens/step over %d rank(s), device %s%s", model.num_params() / 1e6,
             tokens_per_step, comm.size, dev_name, "" if peak else " (peak FLOP/s unknown: no MFU)")
    bar = None
    if comm.rank == 0 and tc.progress:
        from tqdm import tqdm

        bar = tqdm(total=tc.max_steps, initial=step, unit="step", desc="train", mininterval=1.0)

    last_loss = val_loss = None
    gsync.comm_wait_s = 0.0
    t_log = time.perf_counter()
    steps_timed = 0  # steps of this process since t_log (a resumed window has fewer than window.steps)
    stopped = None
    saved_at = step if ckpt is not None else -1
    model.train()
    try:
        while step < tc.max_steps:
            lr = lr_at(step, tc.lr, tc.min_lr, tc.warmup_steps, tc.max_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            step_loss, stop_agreed = run_step(loader.next_batch, step + 1, stop.requested())
            step += 1
            steps_timed += 1
            window.add(step_loss)
            if bar is not None:
                bar.update(1)

            if step % tc.log_interval == 0 or step == tc.max_steps:
                last_loss = window.mean(comm)
                dt = time.perf_counter() - t_log
                tps = tokens_per_step * steps_timed / dt
                rec = dict(step=step, loss=last_loss, lr=lr, tokens_per_s=tps, dt_s=dt,
                           mfu=(flops_per_token * tps / (peak * comm.size)) if peak else None,
                           t_data_s=run_step.t_data, t_compute_s=run_step.t_compute, t_comm_s=gsync.comm_wait_s)
                if has_val and (step % tc.eval_interval == 0 or step == tc.max_steps):
                    rec["val_loss"] = val_loss = evaluate(model, ds, spec, comm)
                metrics.write(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{last_loss:.3f}", **({"val": f"{val_loss:.3f}"} if "val_loss" in rec else {}))
                else:
                    log.info("step %d loss %.4f%s lr %.2e %.0f tok/s", step, last_loss,
                             f" val {rec['val_loss']:.4f}" if "val_loss" in rec else "", lr, tps)
                steps_timed = 0
                run_step.t_data = run_step.t_compute = gsync.comm_wait_s = 0.0
                t_log = time.perf_counter()

            if stop_agreed:
                stopped = stop.reason or "another rank was asked to stop"
                break
            if tc.ckpt_interval and step % tc.ckpt_interval == 0 and step < tc.max_steps:
                _save(spec, comm, step, model, optimizer, loader, window)
                saved_at = step
    finally:
        stop.uninstall()
        loader.close()
        if bar is not None:
            bar.close()

    path = _save(spec, comm, step, model, optimizer, loader, window) if saved_at != step else latest_checkpoint(spec.run_dir)
    if stopped:
        log.warning("stopping at step %d (%s): checkpoint %s; exit %d so the job can be requeued", step, stopped,
                    path, EXIT_REQUEUE)
    else:
        log.info("done: %d steps, loss %s, val loss %s, checkpoint %s", step,
                 f"{last_loss:.4f}" if last_loss is not None else "-",
                 f"{val_loss:.4f}" if val_loss is not None else "-", path)
    return TrainResult(step, stopped, last_loss, val_loss, str(path) if path else None)


@torch.no_grad()
def evaluate(model: CausalLM, ds, spec: JobSpec, comm: Communicator) -> float:
    tc = spec.train
    model.eval()
    ld = TokenLoader(ds, "val", seq_len=tc.seq_len, batch_size=tc.batch_size, rank=comm.rank, world_size=comm.size,
                     seed=tc.seed, mode="sequential", device=comm.device, prefetch=0)
    total = torch.zeros(2, device=comm.device)
    n_batches = min(tc.eval_batches, ld.steps_per_epoch)
    for x, y in ld.batches(n_batches):
        with autocast_for(comm.device, tc.dtype):
            _, loss = model(x, y)
        total += torch.stack([loss.float(), torch.ones((), device=comm.device)])
    comm.allreduce(total, "sum")
    model.train()
    return (total[0] / total[1]).item() if total[1] > 0 else math.nan


def _save(spec, comm, step, model, optimizer, loader, window: LossWindow):
    log_window = window.state(comm)  # a collective: every rank, before rank 0 writes
    comm.barrier()
    path = None
    if comm.rank == 0:
        state = dict(step=step, optimizer=optimizer.state_dict(), loader=loader.state_dict(), rng=torch.get_rng_state(),
                     log_window=log_window)
        meta = {"spec": to_dict(spec), "model": to_dict(model.config), "world_size": comm.size}
        path = save_checkpoint(spec.run_dir, step, model, state, meta, spec.train.keep_checkpoints)
        log.info("checkpoint %s", path)
    comm.barrier()
    return path
