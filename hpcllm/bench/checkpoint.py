"""`hpcllm bench checkpoint`: what a checkpoint costs the training, written synchronously and in the
background (train.async_checkpoint), measured in the same run.

One process (on the CPU, or `--device cuda`: fp32 on one GPU, the state staged into pinned host
memory), the trainer's own step (`TrainStep`) on GPT-2 124M by default (AdamW: the model, its
gradients' optimizer state — about 1.5 GB per checkpoint) and the trainer's own writer
(hpcllm.checkpoint.save_checkpoint). Rounds of --steps steps, their order rotating:
    none    the steps alone
    sync    a checkpoint, then the steps
    async   a background checkpoint started, the steps, then the wait for it (if still writing)
Two figures per mode: the time the training is blocked in the save call (sync: the whole write;
async: the copy to host memory), and the round's time minus the median `none` round, which adds
what the background writer takes from the steps beside it (on a 2-core machine, a core and memory
bandwidth; on a GPU node, little) and any wait at the end. The goal (issue 27): async blocks the
training <= 20% of what sync does, on a model of >= 100M.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time


def main(args) -> int:
    import torch

    from hpcllm.checkpoint import save_checkpoint
    from hpcllm.comm import DistConfig, init_comm
    from hpcllm.model import ModelConfig, build_model
    from hpcllm.parallel.plans import Plan
    from hpcllm.train.config import TrainConfig
    from hpcllm.train.trainer import TrainStep

    torch.set_num_threads(args.threads)
    comm = init_comm(DistConfig(backend="single", device=args.device))
    cfg = ModelConfig(size=args.model, vocab_size=args.vocab).resolve()
    model = build_model(cfg).init_weights(0).to(comm.device)
    plan = Plan(model, model.configure_optimizer(0.1, 1e-4), comm, bucket_mb=4.0)
    run_step = TrainStep(model, plan, comm, TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len,
                                                        dtype="fp32"), accum=1)
    x = torch.randint(0, args.vocab, (args.batch_size, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    x = x.to(comm.device)

    def synchronize():
        if comm.device.type == "cuda":
            torch.cuda.synchronize()

    def batch():
        return x[:, :-1], x[:, 1:]

    root = tempfile.mkdtemp(prefix="hpcllm-bench-ckpt-", dir=args.dir)
    step = 0
    times: dict[str, list[float]] = {"none": [], "sync": [], "async": []}
    inline: dict[str, list[float]] = {"sync": [], "async": []}  # seconds inside the save call itself
    try:
        for _ in range(2):  # warm-up: the optimizer state exists, the first save's directories too
            step += 1
            run_step(batch, step, 0)
        save_checkpoint(root, 0, comm, plan.state_dict(), {}, {"spec": {}}, keep=1)
        modes = list(times)
        for r in range(args.rounds):
            for mode in modes[r % 3:] + modes[:r % 3]:
                t0 = time.perf_counter()
                pending = None
                if mode != "none":
                    result = save_checkpoint(root, step, comm, plan.state_dict(), {}, {"spec": {}}, keep=1,
                                             background=mode == "async")
                    pending = result if mode == "async" else None
                    inline[mode].append(time.perf_counter() - t0)
                for _ in range(args.steps):
                    step += 1
                    run_step(batch, step, 0)
                synchronize()
                if pending is not None:
                    pending.wait()
                    pending.finish()
                times[mode].append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = statistics.median(times["none"])
    stall = {m: statistics.median(t - base for t in times[m]) for m in ("sync", "async")}
    n_bytes = sum(t.numel() * t.element_size() for t in _tensors(plan.state_dict()))
    print(f"model {args.model} ({model.num_params() / 1e6:.0f}M params), checkpoint {n_bytes / 2**30:.2f} GiB, "
          f"batch {args.batch_size}x{args.seq_len} on {comm.device}, {args.threads} thread(s): {args.steps} steps "
          f"{base:.2f} s (median of {args.rounds} rounds)")
    block = {m: statistics.median(inline[m]) for m in ("sync", "async")}
    for m in ("sync", "async"):
        print(f"{m:>5}: training blocked {block[m]:.2f} s per checkpoint; its round {stall[m]:+.2f} s against "
              f"the rounds without one")
    print(f"async/sync, training blocked: {block['async'] / block['sync']:.3f} (goal <= 0.20); whole round: "
          + (f"{stall['async'] / stall['sync']:.3f}" if stall["sync"] > 0 else "sync not measurable in the noise")
          + " (with the background writer's share of the cores and memory bandwidth)")
    return 0


def _tensors(tree):
    import torch

    for v in tree.values():
        if isinstance(v, dict):
            yield from _tensors(v)
        elif torch.is_tensor(v):
            yield v
