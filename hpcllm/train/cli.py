"""Commands of the trainer: train, plot, demo, bench train."""

from __future__ import annotations

import argparse

from hpcllm.errors import ConfigError


def register(sub, bench) -> None:
    from hpcllm.cli import add_spec_args

    p = sub.add_parser("train", help="train a GPT (1 process, mpirun or srun); resumes from the latest checkpoint")
    add_spec_args(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("plot", help="PNG of loss/val loss and throughput of a training run")
    p.add_argument("run_dir")
    p.add_argument("-o", "--output", help="PNG path (default RUN_DIR/training.png)")
    p.set_defaults(func=_plot)

    p = sub.add_parser("demo", help="the embedded default: prepare stdlib sources, train on 2 ranks, plot, sample")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override the demo's train spec")
    p.set_defaults(func=_demo)

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
    p.set_defaults(func=_bench)


def run_train_job(spec) -> int:
    from hpcllm import runtime
    from hpcllm.train.signals import catch_early_signals
    from hpcllm.train.trainer import train

    catch_early_signals()  # replaces submitit's handlers too: the trainer decides what a signal means
    if spec.kind != "train":
        raise ConfigError(f"kind is '{spec.kind}', `hpcllm train` runs kind: train")
    comm = runtime.start(spec)
    try:
        result = train(spec, comm)
    finally:
        comm.close()
    return result.exit_code


def _train(args) -> int:
    from hpcllm.config import load_spec

    return run_train_job(load_spec(args.spec, args.overrides))


def _plot(args) -> int:
    from hpcllm.train.plot import plot_run

    print(plot_run(args.run_dir, args.output))
    return 0


def _demo(args) -> int:
    from hpcllm.train.demo import run_demo

    return run_demo(args.ranks, args.run_dir, args.overrides)


def _bench(args) -> int:
    from hpcllm.bench.train import main

    return main(args)
