"""Commands of the trainer: plot, bench train, bench checkpoint (`hpcllm train` is a job: hpcllm.jobs)."""

from __future__ import annotations

import argparse


def register(sub, bench) -> None:
    p = sub.add_parser("plot", help="PNG of loss/val loss and throughput of a training run")
    p.add_argument("run_dir")
    p.add_argument("-o", "--output", help="PNG path (default RUN_DIR/training.png)")
    p.set_defaults(func=_plot)

    p = bench.add_parser("train", help="tokens/s of hpcllm's training step beside torch DDP (CPU: spawns mpirun) "
                         "or nanoGPT's loop (--device cuda)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: 2 MPI ranks vs DDP/gloo, 10M model; cuda: GPT-2 124M, bf16, compiled, 1 GPU")
    p.add_argument("--ranks", type=int, help="ranks (default 2 on cpu, 1 on cuda: one per GPU)")
    p.add_argument("--model", help="model preset (default small on cpu, gpt2 on cuda)")
    p.add_argument("--batch-size", type=int, help="sequences per rank (default 8 on cpu, 32 on cuda)")
    p.add_argument("--seq-len", type=int, help="default 256 on cpu, 1024 on cuda")
    p.add_argument("--vocab", type=int, help="default 258 (bytes) on cpu, 50304 on cuda (nanoGPT's)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="default fp32 on cpu, bf16 autocast on cuda")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile (default: on cuda only)")
    p.add_argument("--steps", type=int, help="steps per timed round (default 6 on cpu, 20 on cuda)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds, order rotating (the median is reported)")
    p.add_argument("--warmup", type=int, help="untimed steps per implementation first (default 2; 5 compiled)")
    p.add_argument("--bucket-mb", type=float, help="gradient bucket size (default 4 on cpu, 64 on cuda)")
    p.add_argument("--shard", default="none", help="sharding modes to time beside each other, e.g. none,optimizer,full "
                   "(parallel.shard; each is reported with its per-rank memory; with --ranks 1, full is forced on "
                   "the one rank)")
    p.add_argument("--tp-overhead", action="store_true", help="also time the tensor-parallel (DTensor) path at tp=1 "
                   "beside the plain plan, on one rank (--ranks 1)")
    p.set_defaults(func=_bench)

    p = bench.add_parser("checkpoint", help="training stall per checkpoint, synchronous beside background "
                         "(train.async_checkpoint), one process")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", default="gpt2", help="GPT-2 model preset (default gpt2: 124M)")
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="training steps per round: a background write must "
                   "end within them to be free (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of none/sync/async, order rotating (median)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the other core writes)")
    p.add_argument("--dir", help="where checkpoints are written (default: the temp dir)")
    p.set_defaults(func=_bench_checkpoint)


def _bench_checkpoint(args) -> int:
    from hpcllm.bench.checkpoint import main

    return main(args)


def _plot(args) -> int:
    from hpcllm.train.plot import plot_run

    print(plot_run(args.run_dir, args.output))
    return 0


def _bench(args) -> int:
    from hpcllm.bench.train import main

    return main(args)
