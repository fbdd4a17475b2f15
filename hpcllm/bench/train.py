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

On one rank (`--ranks 1`, a GPU's default) the parallel plans' own costs, with nothing to share:
    --shard none,full   FSDP2 forced on a world of one — the trainer gives `none` there
                        (`bench_plan`) — over a one-rank process group (NCCL on a GPU, gloo on CPU)
    --tp-overhead       the tensor-parallel path at tp=1: DTensor parameters (parallelize_module) on
                        a (dp=1, tp=1) mesh and the trainer's per-parameter AdamW for them, beside the
                        plain plan (issue 14: overhead <= 5%)
each with tokens/s, the ratio to `none`, the time of its update (clip + optimizer step) and its
memory (on a GPU: the CUDA peak of its own steps above what every model of the run holds at rest).
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


def bench_plan(mode: str, model, comm, *, make_optimizer, bucket_mb: float, bf16: bool):
    """The plan of parallel.shard=`mode` as the trainer builds it, except `full` on a world of one,
    where build_plan gives `none` (nothing to shard): there the bench builds FSDP2 anyway, so that
    its cost on one device can be measured. Needs a torch.distributed group (the `torch` backend,
    even for one rank). ZeRO-1 is not forced: its reduce buffers are the gradient buckets, which one
    rank does not make."""
    from hpcllm.parallel.build import build_plan
    from hpcllm.parallel.layout import Layout, device_mesh
    from hpcllm.parallel.parallelize import fully_shard_blocks, parallelize
    from hpcllm.parallel.plans import FsdpPlan

    if comm.size == 1 and mode == "full":
        fully_shard_blocks(model, device_mesh(comm), bf16)
        return FsdpPlan(model, make_optimizer(model), comm)
    if comm.size == 1 and mode == "optimizer":
        raise ValueError("parallel.shard=optimizer cannot be forced on one rank (ZeRO-1 shards the gradient "
                         "buckets, which one rank does not make): time it on 2 or more ranks")
    layout = Layout(comm.size, shard=mode)
    return build_plan(parallelize(model, layout, comm, bf16=bf16), layout, comm, make_optimizer=make_optimizer,
                      bucket_mb=bucket_mb)


def dtensor_tp1_plan(model, comm, *, make_optimizer, bf16: bool):
    """The trainer's tensor-parallel plan on groups of one rank: every layer's parameters DTensors on
    a named (dp=ranks, tp=1) mesh, the logits "split" by vocabulary over one rank (loss_parallel). With
    `make_optimizer` as the trainer's for tp > 1 (one parameter at a time), the whole path costs what
    a tp run pays beyond its communication."""
    from hpcllm.parallel.layout import device_mesh
    from hpcllm.parallel.parallelize import split_model
    from hpcllm.parallel.tensor import TensorParallelPlan

    mesh = device_mesh(comm, 1, named=True)
    split_model(model, mesh["tp"], vocab_parallel=True)
    return TensorParallelPlan(model, make_optimizer(model), comm, mesh, mode="none", bucket_mb=25.0,
                              vocab_parallel=True)


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
    from hpcllm.train.trainer import TrainStep, autocast_for

    cuda = a["device"] == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(1)
    # one rank with a plan that lives on torch.distributed (FSDP2, DTensor): a one-rank process group
    one_rank_group = a["ranks"] == 1 and (a["shard"] != ["none"] or a["tp_overhead"])
    backend = ("torch" if cuda else "mpi") if a["ranks"] > 1 else ("torch" if one_rank_group else "single")
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

    plans = {}  # implementation name -> its plan (over the job's comm): memory and update time

    def hpcllm_step(step_comm, shard="none", name=None, tp1=False):
        """The trainer's step, exactly; over `step_comm` (a world of one: no communication at all)."""
        model = build_model(cfg).init_weights(0).to(device)
        bf16 = a["dtype"] == "bf16"
        if tp1:  # the trainer's optimizer under tp: one parameter at a time (DTensor and plain mixed)
            plan = dtensor_tp1_plan(model, step_comm, bf16=bf16, make_optimizer=lambda m: m.configure_optimizer(
                0.1, 1e-4, fused=False, foreach=False))
        else:
            plan = bench_plan(shard, model, step_comm, bucket_mb=a["bucket_mb"], bf16=bf16,
                              make_optimizer=lambda m: m.configure_optimizer(0.1, 1e-4, fused=cuda))
        run_step = TrainStep(model, plan, step_comm, tc, accum=1)
        if name is not None:
            plans[name] = plan

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

    step_ours, ours = hpcllm_step(comm, name="hpcllm")
    impls = {"hpcllm": step_ours}
    for shard in a["shard"]:
        if shard != "none":
            impls[f"hpcllm {shard}"] = hpcllm_step(comm, shard, name=f"hpcllm {shard}")[0]
    if a["tp_overhead"]:
        impls["hpcllm tp1"] = hpcllm_step(comm, name="hpcllm tp1", tp1=True)[0]
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
    # on a GPU, each implementation's CUDA peak during its own steps above what is allocated when they
    # start (every model and optimizer of this run at rest): its activations, gradients and buffers
    step_peak: dict[str, int] = {}
    names = list(impls)
    for r in range(a["rounds"]):
        for name in names[r % len(names):] + names[: r % len(names)]:
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                at_rest = torch.cuda.memory_allocated(device)
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
            if cuda:
                step_peak[name] = max(step_peak.get(name, 0), torch.cuda.max_memory_allocated(device) - at_rest)
    update_ms = {name: _update_ms(impls[name], plans[name], sync) for name in plans}
    if comm.rank == 0:
        per_rank = B * T * a["steps"]
        tps = {k: per_rank * (1 if k == "1 rank" else comm.size) / statistics.median(v) for k, v in times.items()}
        peer = "ddp" if "ddp" in impls else "plain"
        paired = [p / q for p, q in zip(times[peer], times["hpcllm"])]
        # every implementation against the trainer's plain step, round by round (throughput ratios)
        vs_hpcllm = {k: [q / p for p, q in zip(v, times["hpcllm"])] for k, v in times.items() if k != "1 rank"}
        from hpcllm.train.metrics import device_peak

        dev_name, peak = device_peak(device)
    memory = {k: p.memory() | {"update_ms": update_ms[k]} | ({"step_peak_bytes": step_peak[k]} if cuda else {})
              for k, p in plans.items()}  # after the rounds: every buffer and state exists
    if comm.rank == 0:
        print("RESULT " + json.dumps({"tokens_per_s": tps, "paired_ratios": paired, "vs_hpcllm": vs_hpcllm,
                                      "params": ours.num_params(), "memory": memory,
                                      "flops_per_token": ours.estimate_flops_per_token(T), "device": dev_name,
                                      "peak": peak}), flush=True)
    if "ddp" in impls:
        del impls
        tdist.barrier()
        if not cuda:
            release_gloo_work()
            tdist.destroy_process_group()
    comm.close()


def _update_ms(step, plan, sync, steps: int = 3) -> float:
    """Milliseconds of a plan's update (gradient clipping and the optimizer step) per training step,
    timed apart in a few untimed steps after the rounds: where a plan's time goes besides forward and
    backward (the tensor-parallel path's per-parameter AdamW, FSDP2's sharded one)."""
    spent = [0.0]

    def timed(fn):
        def run(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            fn(*args, **kwargs)
            sync()
            spent[0] += time.perf_counter() - t0

        return run

    plan.clip_grad_norm, plan.step = timed(plan.clip_grad_norm), timed(plan.step)  # instance attributes shadow
    try:
        for i in range(steps):
            step(i)
    finally:
        del plan.clip_grad_norm, plan.step
    return 1000 * spent[0] / steps


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
    if conf["ranks"] == 1 and "optimizer" in conf["shard"]:
        raise HpcllmError("bench train --shard optimizer needs --ranks 2 or more: ZeRO-1 shards the gradient "
                          "buckets, which one rank does not make (full is forced on one rank: FSDP2)")
    conf["tp_overhead"] = bool(getattr(args, "tp_overhead", False))
    if conf["tp_overhead"] and conf["ranks"] != 1:
        raise HpcllmError(f"bench train --tp-overhead measures the DTensor path's own cost on one device: use "
                          f"--ranks 1, not {conf['ranks']}")
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
    if len(conf["shard"]) > 1 or conf["tp_overhead"]:
        _print_plans(conf, res, cuda=args.device == "cuda")
    if "1 rank" in tps:
        ideal = n * tps["1 rank"]
        print(f"  {n} ranks  no communication  {tps['alone']:>9,.0f} tokens/s  (every rank trains alone)")
        print(f"  1 rank   alone             {tps['1 rank']:>9,.0f} tokens/s  (the other ranks idle)")
        print(f"  scaling efficiency {n} vs 1 rank  hpcllm {tps['hpcllm'] / ideal:.2f}, DDP {tps['ddp'] / ideal:.2f}, "
              f"ceiling without communication {tps['alone'] / ideal:.2f}")
        print(f"  hpcllm / no communication     {tps['hpcllm'] / tps['alone']:.2f}x")
    return 0


def _print_plans(conf: dict, res: dict, cuda: bool) -> None:
    """The plans side by side: tokens/s and its ratio to `none` (per round too), the update's time,
    the model state per rank and, on a GPU, the CUDA peak of each plan's own steps."""
    n, tps, memory, rounds = conf["ranks"], res["tokens_per_s"], res["memory"], res["vs_hpcllm"]
    rows = [(mode, "hpcllm" if mode == "none" else f"hpcllm {mode}") for mode in conf["shard"]]
    if conf["tp_overhead"]:
        rows.append(("tp=1 DTensor", "hpcllm tp1"))
    state_keys = ("params_bytes", "grads_bytes", "optimizer_bytes")
    base = memory.get("hpcllm", {})
    base_state = sum(base.get(k, 0) for k in state_keys)
    if n == 1:
        print("  one rank: each plan forced on a world of one (the trainer's choice there is `none`): its cost with "
              "nothing to share, over a one-rank process group" + (" (NCCL)" if cuda else " (gloo)"))
    peak_col = "   step peak MB" if cuda else ""
    print(f"  plan            tokens/s   vs none (per round)   update ms   per rank MB: params   grads   optimizer"
          f"   state vs none{peak_col}")
    for label, name in rows:
        m = memory.get(name, {})
        state = sum(m.get(k, 0) for k in state_keys)
        r = rounds[name]
        peak = f"   {m.get('step_peak_bytes', 0) / 2**20:>13,.0f}" if cuda else ""
        print(f"  {label:<13} {tps[name]:>10,.0f}   {tps[name] / tps['hpcllm']:>5.2f}x ({min(r):.2f}-{max(r):.2f}x)"
              f"   {m.get('update_ms', 0):>9.1f}   {m.get('params_bytes', 0) / 2**20:>16.1f} "
              f"{m.get('grads_bytes', 0) / 2**20:>7.1f} {m.get('optimizer_bytes', 0) / 2**20:>11.1f}"
              f"   {state / max(base_state, 1):>13.2f}x{peak}")
    for mode in conf["shard"]:
        if mode != "none":
            print(f"  ratio {mode} / none: {tps[f'hpcllm {mode}'] / tps['hpcllm']:.2f}x tokens/s")
    if conf["tp_overhead"]:
        ratio = tps["hpcllm tp1"] / tps["hpcllm"]
        verdict = (": met" if ratio >= 0.95 else ": NOT met") if cuda else ", a GPU figure"
        print(f"  ratio DTensor tp=1 / plain: {ratio:.2f}x tokens/s — overhead {100 * (1 - ratio):.1f}% "
              f"(issue 14's goal <= 5%{verdict})")
    if cuda:
        print("  step peak: CUDA memory allocated during a plan's own steps above what every model of this run holds "
              "at rest (its activations, gradients, gathered parameters)")
    else:
        print(f"  peak RSS of rank 0 (all plans in one process): {base.get('peak_bytes', 0) / 2**20:.0f} MB")


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
