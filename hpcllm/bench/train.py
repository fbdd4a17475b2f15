"""`hpcllm bench train`: tokens/s of hpcllm's training step beside its peer, measured in the same run.

CPU (default): `mpirun -np N` ranks of this module's worker, one thread per rank, the same model and
the same synthetic batches for every implementation, in timed rounds whose order rotates each round:
    hpcllm   the trainer's own step (`TrainStep`): bucketed gradient sync over the mpi backend
             (with `--shard none,optimizer,full`: one such line per sharding mode, each with its
             per-rank memory — ZeRO-1 over the mpi backend, FSDP2 over gloo)
    ddp      torch DistributedDataParallel over gloo, the same optimizer and clipping
    alone    hpcllm's step with no communication at all: every rank trains by itself
    1 rank   the same on rank 0 while the other ranks sleep: the single-process reference
"alone" is the machine's own ceiling for scaling: N ranks sharing memory bandwidth and caches are
slower per rank than one rank alone whatever the communication. The 1-rank reference runs inside
the same job, interleaved with the others, so the machine's drift (runs minutes apart differed by
10% on the 2-core VM) stays out of the scaling figure.

GPU (`--device cuda`): GPT-2 124M, bf16 autocast, torch.compile, fused AdamW, batch 32 x 1024 per
GPU. The peer is nanoGPT's loop on the same model (compiled, autocast, fused AdamW,
`zero_grad(set_to_none=True)`, clipping, `loss.item()` every step), in DDP over NCCL when N > 1.
Reports tokens/s, MFU against the device's peak, and the ratio to nanoGPT's bench.py on one H100.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

from hpcllm.errors import HpcllmError

# nanoGPT's bench.py, GPT-2 124M, batch 32 x 1024, bf16, compiled, on one H100 (the anchor)
NANOGPT_H100_TOKENS_PER_S = 484_000

CPU_DEFAULTS = dict(ranks=2, model="small", batch_size=8, seq_len=256, vocab=258, dtype="fp32", compile=False,
                    bucket_mb=4.0)
GPU_DEFAULTS = dict(ranks=1, model="gpt2", batch_size=32, seq_len=1024, vocab=50304, dtype="bf16", compile=True,
                    bucket_mb=64.0)


def _idle_until_rank0_done(comm) -> None:
    """A barrier that sleeps instead of spinning, so an idle rank leaves its core to rank 0."""
    req = comm.comm.Ibarrier()
    while not req.Test():
        time.sleep(0.002)


def _worker(a: dict) -> None:
    import torch
    import torch.distributed as tdist

    from hpcllm.comm import DistConfig, SingleProcess, init_comm
    from hpcllm.comm.torchdist import TorchCommunicator, release_gloo_work
    from hpcllm.model import ModelConfig, build_model
    from hpcllm.train.config import TrainConfig
    from hpcllm.parallel.plans import build_plan
    from hpcllm.train.trainer import TrainStep, autocast_for

    cuda = a["device"] == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(1)
    backend = ("torch" if cuda else "mpi") if a["ranks"] > 1 else "single"
    comm = init_comm(DistConfig(backend=backend, device=a["device"], bucket_mb=a["bucket_mb"]))
    device = comm.device
    cfg = ModelConfig(size=a["model"], vocab_size=a["vocab"]).resolve()
    B, T = a["batch_size"], a["seq_len"]
    g = torch.Generator().manual_seed(comm.rank)
    data = [torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g).to(device) for _ in range(4)]
    tc = TrainConfig(batch_size=B, seq_len=T, dtype=a["dtype"], compile=a["compile"])

    def make(wrap_ddp: bool = False):
        model = build_model(cfg).init_weights(0).to(device)
        opt = model.configure_optimizer(0.1, 1e-4, fused=cuda)
        if wrap_ddp:
            model = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=a["bucket_mb"])
        return model, opt

    batch = {"i": 0}

    def next_batch():
        x = data[batch["i"] % len(data)]
        return x[:, :-1], x[:, 1:]

    plans = {}

    def hpcllm_step(step_comm, shard="none"):
        """The trainer's step, exactly; over `step_comm` (a world of one: no communication at all)."""
        model = build_model(cfg).init_weights(0).to(device)
        plan = build_plan(shard, model, step_comm, bucket_mb=a["bucket_mb"], bf16=a["dtype"] == "bf16",
                          make_optimizer=lambda m: m.configure_optimizer(0.1, 1e-4, fused=cuda))
        run_step = TrainStep(model, plan, step_comm, tc, accum=1)
        if step_comm is comm:
            plans[shard] = plan

        def step(i):
            batch["i"] = i
            run_step(next_batch, i, False)

        return step, model

    def plain_step(model, opt):
        fwd = torch.compile(model) if a["compile"] else model

        def step(i):  # nanoGPT's loop: bench.py's, with train.py's gradient clipping as hpcllm clips
            x = data[i % len(data)]
            with autocast_for(device, a["dtype"]):
                _, loss = fwd(x[:, :-1], x[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            loss.item()

        return step

    step_ours, ours = hpcllm_step(comm)
    impls = {"hpcllm": step_ours}
    for shard in a.get("shard", ["none"]):
        if shard != "none" and comm.size > 1:
            impls[f"hpcllm {shard}"] = hpcllm_step(comm, shard)[0]
    if comm.size > 1:
        if not cuda:  # the gloo process group DDP uses (rendezvous over MPI); on GPU it is the comm's own
            TorchCommunicator(comm.world, device, 300.0, comm.comm)
        impls["ddp"] = plain_step(*make(wrap_ddp=True))
    else:
        impls["plain"] = plain_step(*make())
    if not cuda and comm.size > 1:
        alone = SingleProcess(dataclasses.replace(comm.world, rank=0, size=1), device, comm.timeout_s)
        impls["alone"] = hpcllm_step(alone)[0]
        impls["1 rank"] = hpcllm_step(alone)[0] if comm.rank == 0 else None

    def sync():
        if cuda:
            torch.cuda.synchronize()
        comm.barrier()

    def run_steps(fn) -> None:
        for i in range(a["steps"]):
            fn(i)
        if cuda:
            torch.cuda.synchronize()

    for fn in impls.values():  # warm-up (and compilation); "1 rank" exists on rank 0 only
        if fn is not None:
            for i in range(a["warmup"]):
                fn(i)
    sync()
    times: dict[str, list[float]] = {k: [] for k in impls}
    names = list(impls)
    for r in range(a["rounds"]):
        for name in names[r % len(names):] + names[: r % len(names)]:
            sync()
            t0 = time.perf_counter()
            if name == "1 rank":  # rank 0 alone, timed by itself; the others sleep until it is done
                if comm.rank == 0:
                    run_steps(impls[name])
                    times[name].append(time.perf_counter() - t0)
                _idle_until_rank0_done(comm)
            else:  # until the last rank is done
                run_steps(impls[name])
                comm.barrier()
                times[name].append(time.perf_counter() - t0)
    if comm.rank == 0:
        per_rank = B * T * a["steps"]
        tps = {k: per_rank * (1 if k == "1 rank" else comm.size) / statistics.median(v) for k, v in times.items()}
        peer = "ddp" if "ddp" in impls else "plain"
        paired = [p / q for p, q in zip(times[peer], times["hpcllm"])]
        from hpcllm.train.metrics import device_peak

        dev_name, peak = device_peak(device)
    memory = {k: p.memory() for k, p in plans.items()}  # after the rounds: every buffer and state exists
    if comm.rank == 0:
        print("RESULT " + json.dumps({"tokens_per_s": tps, "paired_ratios": paired, "params": ours.num_params(),
                                      "memory": memory,
                                      "flops_per_token": ours.estimate_flops_per_token(T), "device": dev_name,
                                      "peak": peak}), flush=True)
    if "ddp" in impls:
        del impls
        tdist.barrier()
        if not cuda:
            release_gloo_work()
            tdist.destroy_process_group()
    comm.close()


def _launch(conf: dict) -> dict:
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    if conf["device"] == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "hpcllm.bench.train", json.dumps(conf)]
    if conf["ranks"] > 1:
        cmd = ["mpirun", "-np", str(conf["ranks"]), "--oversubscribe", "--bind-to", "none"] + cmd
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise HpcllmError(f"bench worker on {conf['ranks']} rank(s) failed (exit {p.returncode}):\n{p.stderr[-3000:]}")


def main(args) -> int:
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise HpcllmError("bench train --device cuda: no CUDA device is visible (CUDA_VISIBLE_DEVICES, --gpus?)")
    defaults = GPU_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    conf = {k: (getattr(args, k) if getattr(args, k, None) is not None else v) for k, v in defaults.items()}
    conf |= dict(device=args.device, rounds=args.rounds,
                 steps=args.steps if args.steps is not None else (20 if args.device == "cuda" else 6),
                 warmup=args.warmup if args.warmup is not None else (5 if conf["compile"] else 2))
    conf["shard"] = [m.strip() for m in args.shard.split(",") if m.strip()] if getattr(args, "shard", None) else ["none"]
    bad = [m for m in conf["shard"] if m not in ("none", "optimizer", "full")]
    if bad or "none" not in conf["shard"]:
        raise HpcllmError(f"bench train --shard: a comma list of none, optimizer, full including none (the "
                          f"reference), got {args.shard!r}")
    for key in ("ranks", "steps", "rounds", "batch_size", "seq_len"):
        if conf[key] < 1:
            raise HpcllmError(f"bench train: --{key.replace('_', '-')} must be >= 1, got {conf[key]}")
    n = conf["ranks"]
    print(f"# hpcllm bench train: {args.device}, model {conf['model']}, {n} rank(s) x batch {conf['batch_size']} x "
          f"seq {conf['seq_len']}, {conf['dtype']}{', compiled' if conf['compile'] else ''}, {conf['steps']} steps "
          f"per round, median of {conf['rounds']} rounds" + (", 1 thread per rank" if args.device == "cpu" else ""),
          flush=True)
    res = _launch(conf)
    tps = res["tokens_per_s"]
    peer = "ddp" if "ddp" in tps else "plain"
    peer_name = {"ddp": "torch DDP" + (" (gloo)" if args.device == "cpu" else " (NCCL)"),
                 "plain": "nanoGPT-style loop"}[peer]
    lo, hi = min(res["paired_ratios"]), max(res["paired_ratios"])
    print(f"  params {res['params'] / 1e6:.1f}M, device {res['device']}")
    print(f"  {n} rank(s)  hpcllm              {tps['hpcllm']:>12,.0f} tokens/s")
    print(f"  {n} rank(s)  {peer_name:<19} {tps[peer]:>12,.0f} tokens/s")
    print(f"  ratio hpcllm / {peer_name}  {tps['hpcllm'] / tps[peer]:.2f}x  (per round {lo:.2f}-{hi:.2f}x)")
    if res["peak"]:
        for k in ("hpcllm", peer):
            mfu = res["flops_per_token"] * tps[k] / (res["peak"] * n)
            print(f"  MFU {k:<7} {100 * mfu:.1f}% of {res['peak'] / 1e12:.0f} TFLOP/s per GPU")
    if args.device == "cuda":
        print(f"  ratio hpcllm / nanoGPT bench.py on one H100 ({NANOGPT_H100_TOKENS_PER_S:,} tokens/s): "
              f"{tps['hpcllm'] / (n * NANOGPT_H100_TOKENS_PER_S):.2f}x per GPU")
    memory = res.get("memory", {})
    if len(conf["shard"]) > 1 and n > 1:
        ref = tps["hpcllm"]
        base = memory.get("none", {})
        print("  parallel.shard   tokens/s   vs none   per rank MB: params   grads   optimizer   model state vs none")
        for mode in conf["shard"]:
            name = "hpcllm" if mode == "none" else f"hpcllm {mode}"
            m = memory.get(mode, {})
            state = sum(m.get(k, 0) for k in ("params_bytes", "grads_bytes", "optimizer_bytes"))
            base_state = sum(base.get(k, 0) for k in ("params_bytes", "grads_bytes", "optimizer_bytes"))
            print(f"  {mode:<14} {tps[name]:>10,.0f}   {tps[name] / ref:>6.2f}x   "
                  f"{m.get('params_bytes', 0) / 2**20:>16.1f} {m.get('grads_bytes', 0) / 2**20:>7.1f} "
                  f"{m.get('optimizer_bytes', 0) / 2**20:>11.1f}   {state / max(base_state, 1):.2f}x "
                  f"(optimizer {m.get('optimizer_bytes', 0) / max(base.get('optimizer_bytes', 1), 1):.2f}x)")
        print(f"  peak RSS of rank 0 (all modes in one process): {base.get('peak_bytes', 0) / 2**20:.0f} MB")
    if "1 rank" in tps:
        ideal = n * tps["1 rank"]
        print(f"  {n} ranks  no communication  {tps['alone']:>9,.0f} tokens/s  (every rank trains alone)")
        print(f"  1 rank   alone             {tps['1 rank']:>9,.0f} tokens/s  (the other ranks idle)")
        print(f"  scaling efficiency {n} vs 1 rank  hpcllm {tps['hpcllm'] / ideal:.2f}, DDP {tps['ddp'] / ideal:.2f}, "
              f"ceiling without communication {tps['alone'] / ideal:.2f}")
        print(f"  hpcllm / no communication     {tps['hpcllm'] / tps['alone']:.2f}x")
    return 0


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
