"""`hpcllm bench allreduce`: nccl-tests style table, hpcllm backends beside raw mpi4py.

Run it on the ranks you want to measure: `mpirun -np 2 hpcllm bench allreduce` or
`srun -n 2 --mpi=pmix hpcllm bench allreduce`. For every size, rounds of raw
`Allreduce(MPI.IN_PLACE, ...)` on a numpy buffer and of the backend's allreduce on a torch tensor
alternate, so the machine's noise hits both alike; the median round of each is reported.
algbw = bytes / time; busbw = algbw * 2(n-1)/n, the figure comparable across rank counts.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np
import torch

from hpcllm.comm import DistConfig, detect_world, init_comm, mpi_comm_world
from hpcllm.errors import HpcllmError


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise HpcllmError(f"bad size '{text}' (examples: 4K, 1M, 16M, 1G)") from None


def _fmt_size(n: int) -> str:
    for unit, m in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= m and n % m == 0:
            return f"{n // m}{unit}"
    return str(n)


def _round(fn: Callable[[], None], iters: int, barrier: Callable[[], None]) -> float:
    barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def run(backends: list[str], sizes: list[int], rounds: int, timeout_s: float, device: str) -> list[dict]:
    # checks the launcher (srun without PMIx, rank disagreement) before MPI_Init can abort cryptically
    mpi_comm_world(detect_world())
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank, n = world.Get_rank(), world.Get_size()
    rows: list[dict] = []
    if rank == 0:
        print(f"# hpcllm bench allreduce: {n} ranks, float32, in place; median of {rounds} rounds", flush=True)
        print(f"# {'size':>6} {'count':>10} {'impl':>8} {'time(us)':>10} {'algbw(GB/s)':>12} "
              f"{'busbw(GB/s)':>12} {'vs mpi4py':>9}", flush=True)
    # One backend at a time, each beside its own raw mpi4py reference: Horovod's background thread
    # polls and would slow down whatever else runs in the process, so it always goes last.
    for b in sorted(backends, key=lambda b: b == "horovod"):
        comm = init_comm(DistConfig(backend=b, timeout_s=timeout_s, device=device))
        if rank == 0 and len(backends) > 1:
            print(f"# backend {b}", flush=True)
        for size in sizes:
            rows += _measure(world, MPI, comm, b, size, rounds)
        comm.close()
    return rows


def _measure(world, MPI, comm, backend: str, size: int, rounds: int) -> list[dict]:
    rank, n = world.Get_rank(), world.Get_size()
    rows = []
    count = max(1, size // 4)
    iters = int(min(200, max(3, 2e8 / max(size, 1) / 4)))
    raw = np.ones(count, dtype=np.float32)
    tensor = torch.ones(count, dtype=torch.float32, device=comm.device)
    impls: dict[str, Callable[[], None]] = {
        "mpi4py": lambda: world.Allreduce(MPI.IN_PLACE, raw, op=MPI.SUM),
        backend: lambda: comm.allreduce(tensor, "sum"),
    }
    times: dict[str, list[float]] = {k: [] for k in impls}
    for fn in impls.values():  # warm-up: connections, algorithm selection
        _round(fn, 2, world.Barrier)
    for _ in range(rounds):
        for name, fn in impls.items():
            # the slowest rank's time is the collective's time
            times[name].append(world.allreduce(_round(fn, iters, world.Barrier), op=MPI.MAX))
    base = statistics.median(times["mpi4py"])
    for name, ts in times.items():
        t = statistics.median(ts)
        algbw = size / t / 1e9
        row = dict(size=size, count=count, impl=name, time_us=t * 1e6, algbw=algbw,
                   busbw=algbw * 2 * (n - 1) / n if n > 1 else 0.0, ratio=base / t)
        rows.append(row)
        if rank == 0:
            print(f"  {_fmt_size(size):>6} {count:>10} {name:>8} {row['time_us']:>10.1f} {algbw:>12.3f} "
                  f"{row['busbw']:>12.3f} {row['ratio']:>8.2f}x", flush=True)
    return rows


def main(args) -> int:
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    for b in backends:
        if b not in ("mpi", "torch", "horovod"):
            raise HpcllmError(f"--backend: unknown backend '{b}' (mpi, torch, horovod)")
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    world = detect_world()
    if not world.mpi_launched:
        print("note: not started by mpirun/srun: measuring a world of 1 rank", flush=True)
    run(backends, sizes, args.rounds, args.timeout_s, args.device)
    return 0
