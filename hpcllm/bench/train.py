"""`hpcllm bench train`: tokens/s of hpcllm's data-parallel step beside torch DDP, and scaling.

Spawns its own runs: `mpirun -np N` (and 1 rank, for scaling efficiency) of this module's worker.
In each run the implementations train the same model on the same synthetic batches in alternating
timed rounds — hpcllm's bucketed gradient sync on the mpi backend, torch DistributedDataParallel on
gloo, and the same step with no communication at all (every rank trains alone) — and the median
round of each is reported. The last one is the machine's own ceiling for scaling: N ranks sharing
memory bandwidth and caches are slower per rank than one rank alone, with or without communication,
so "hpcllm / no communication" is the share of it that data parallelism keeps. One thread per rank.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time


def _worker(args: dict) -> None:
    import torch
    import torch.distributed as tdist

    from hpcllm import dist
    from hpcllm.dist.torchdist import TorchCommunicator, release_gloo_work
    from hpcllm.model import GPT, ModelConfig
    from hpcllm.train.grad_sync import GradSync

    torch.set_num_threads(1)
    comm = dist.init(dist.DistConfig(backend="mpi", bucket_mb=args["bucket_mb"]))
    cfg = ModelConfig(size=args["model"]).resolve(258)
    B, T = args["batch_size"], args["seq_len"]
    g = torch.Generator().manual_seed(comm.rank)
    data = [torch.randint(0, 258, (B, T + 1), generator=g) for _ in range(4)]

    ours = GPT(cfg).init_weights(0)
    gs = GradSync(list(ours.parameters()), comm, args["bucket_mb"])
    opt_a = ours.configure_optimizer(0.1, 1e-4, fused=False)

    def step_ours(i):
        x = data[i % 4]
        ours(x[:, :-1], x[:, 1:])[1].backward()
        gs.finish()
        opt_a.step()
        gs.zero_grad()

    ddp_model = None
    if comm.size > 1:
        # creates the gloo process group DDP uses (rendezvous over MPI)
        TorchCommunicator(comm.world, comm.device, 300.0, comm.comm)
        ddp_model = torch.nn.parallel.DistributedDataParallel(GPT(cfg).init_weights(0),
                                                              bucket_cap_mb=args["bucket_mb"])
        opt_b = ddp_model.module.configure_optimizer(0.1, 1e-4, fused=False)

        def step_ddp(i):
            x = data[i % 4]
            opt_b.zero_grad()
            ddp_model(x[:, :-1], x[:, 1:])[1].backward()
            opt_b.step()

        alone = GPT(cfg).init_weights(0)
        opt_c = alone.configure_optimizer(0.1, 1e-4, fused=False)

        def step_alone(i):
            x = data[i % 4]
            opt_c.zero_grad()
            alone(x[:, :-1], x[:, 1:])[1].backward()
            opt_c.step()

    impls = {"hpcllm": step_ours} | ({"ddp": step_ddp, "alone": step_alone} if ddp_model is not None else {})
    times = {k: [] for k in impls}
    for fn in impls.values():
        for i in range(2):
            fn(i)
    for _ in range(args["rounds"]):
        for name, fn in impls.items():
            comm.barrier()
            t0 = time.perf_counter()
            for i in range(args["steps"]):
                fn(i)
            comm.barrier()
            times[name].append(time.perf_counter() - t0)
    tokens = B * T * comm.size * args["steps"]
    if comm.rank == 0:
        print("RESULT " + json.dumps({k: tokens / statistics.median(v) for k, v in times.items()}
                                     | {"params": ours.num_params()}), flush=True)
    if ddp_model is not None:
        del ddp_model
        tdist.barrier()
        release_gloo_work()
        tdist.destroy_process_group()
    comm.close()


def _run(n: int, args: dict) -> dict:
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
    # under mpirun even for 1 rank, so both runs pay the same MPI costs
    cmd = ["mpirun", "-np", str(n), "--oversubscribe", "--bind-to", "none",
           sys.executable, "-m", "hpcllm.bench.train", json.dumps(args)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"bench worker on {n} rank(s) failed (exit {p.returncode}):\n{p.stderr[-3000:]}")


def main(args) -> int:
    conf = dict(model=args.model, batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps,
                bucket_mb=args.bucket_mb, rounds=args.rounds)
    print(f"# hpcllm bench train: model {args.model}, {args.ranks} ranks x batch {args.batch_size} x seq "
          f"{args.seq_len}, {args.steps} steps per round, median of {args.rounds} rounds, 1 thread per rank",
          flush=True)
    multi = _run(args.ranks, conf)
    single = _run(1, conf)
    print(f"  params {multi['params'] / 1e6:.1f}M")
    print(f"  {args.ranks} ranks  hpcllm (mpi)  {multi['hpcllm']:>10,.0f} tokens/s")
    print(f"  {args.ranks} ranks  torch DDP     {multi['ddp']:>10,.0f} tokens/s")
    print(f"  ratio hpcllm / DDP            {multi['hpcllm'] / multi['ddp']:.2f}x")
    print(f"  {args.ranks} ranks  no communication {multi['alone']:>7,.0f} tokens/s  (every rank trains alone)")
    print(f"  1 rank   hpcllm        {single['hpcllm']:>10,.0f} tokens/s")
    ideal = args.ranks * single["hpcllm"]
    print(f"  scaling efficiency {args.ranks} vs 1 rank  hpcllm {multi['hpcllm'] / ideal:.2f}, DDP "
          f"{multi['ddp'] / ideal:.2f}, ceiling without communication {multi['alone'] / ideal:.2f}")
    print(f"  hpcllm / no communication     {multi['hpcllm'] / multi['alone']:.2f}x")
    return 0


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
