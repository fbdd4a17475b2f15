"""`hpcllm bench monitor` (what live metrics cost a training step; hpcllm.bench.monitor)."""

from __future__ import annotations


def register(sub, bench) -> None:
    p = bench.add_parser("monitor", help="what live Prometheus metrics (metrics.prometheus_dir/pushgateway) cost a "
                         "training step: each hook timed, and steps with and without them")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", default="small", help="model preset (default small: hpcllm bench train's CPU model)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=6, help="rounds, alternating on/off (the median is reported)")
    p.add_argument("--log-interval", type=int, default=10, help="train.log_interval of the hooks")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between exports during the A/B rounds")
    p.add_argument("--ranks", type=int, default=64, help="ranks whose series the exported table holds")
    p.set_defaults(func=_bench)


def _bench(args) -> int:
    from hpcllm.bench.monitor import main

    return main(args)
