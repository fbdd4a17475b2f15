"""Commands of the distributed runtime: `hpcllm bench allreduce`."""

from __future__ import annotations


def register(sub, bench) -> None:
    p = bench.add_parser("allreduce", help="allreduce busbw per backend beside raw mpi4py (run under mpirun/srun)")
    p.add_argument("--backend", default="mpi,torch", help="comma list of mpi, torch, horovod (default: mpi,torch)")
    p.add_argument("--sizes", default="4K,1M,16M,64M", help="comma list of message sizes (default: 4K,1M,16M,64M)")
    p.add_argument("--rounds", type=int, default=5, help="alternating timed rounds per size (median is shown)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="stall watchdog timeout")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.set_defaults(func=_bench_allreduce)


def _bench_allreduce(args) -> int:
    from hpcllm.bench.allreduce import main

    return main(args)
