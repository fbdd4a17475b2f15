"""`hpcllm bench monitor`: what live Prometheus metrics (hpcllm.monitor) cost a training step.

One process, the trainer's own step (`TrainStep`, the CPU bench model of `hpcllm bench train` by
default), timed in rounds whose order alternates:
    off   the step alone
    on    the step with the trainer's hooks (the step counter every step, the log-step hook every
          --log-interval steps) while the exporter thread rewrites a textfile every --interval
          seconds (1 s by default: 15x the default metrics.prometheus_interval_s) from a table
          holding --ranks ranks' series
and, measured apart, each hook's own cost, from which the overhead at the defaults follows:
    (step hook + log hook / log_interval) / step time + export time / prometheus_interval_s
The A/B ratio is printed too; on a shared machine its noise is larger than the effect.
"""

from __future__ import annotations

import statistics
import tempfile
import time


def hook_costs(ranks: int = 64, calls: int = 200_000) -> dict:
    """Seconds per call of the per-step hook and the log-step hook (one rank), and of one export
    (render + atomic textfile write) of a training table of `ranks` ranks."""
    from hpcllm.comm import DistConfig, init_comm

    mon, exporter, tmp = _monitor(ranks, interval_s=3600.0)
    try:
        t0 = time.perf_counter()
        for i in range(calls):
            mon.train_step(i)
        step_s = (time.perf_counter() - t0) / calls
        comm = init_comm(DistConfig(backend="single", device="cpu"))
        rec = dict(step=1, loss=2.0, lr=1e-4, tokens_per_s=1e4, dt_s=1.0, mfu=None)
        n = 2000
        t0 = time.perf_counter()
        for _ in range(n):
            mon.train_logged(comm, rec, 0.01, 0.5, 0.1, 10)
        log_s = (time.perf_counter() - t0) / n
        n = 50
        t0 = time.perf_counter()
        for _ in range(n):
            exporter.export()
        export_s = (time.perf_counter() - t0) / n
    finally:
        tmp.cleanup()
    return dict(step_hook_s=step_s, log_hook_s=log_s, export_s=export_s)


def _monitor(ranks: int, interval_s: float):
    from hpcllm.monitor import Monitor
    from hpcllm.monitor.export import Exporter, Table, TextfileSink

    hosts = [f"node{r // 4:03d}" for r in range(ranks)]
    mon = Monitor(active=True, exporting=True, hosts=hosts)
    mon.table = Table(("bench", "bench"))
    mon.train_started(1000, 0)
    for r in range(ranks):  # the series a `ranks`-rank job holds
        for name in ("hpcllm_train_rank_busy_seconds", "hpcllm_train_rank_data_wait_fraction",
                     "hpcllm_train_rank_comm_fraction"):
            mon.table.set(name, 0.5, mon._rank(r))
    tmp = tempfile.TemporaryDirectory(prefix="hpcllm-bench-monitor-")
    exporter = mon.exporter = Exporter(mon.table, [TextfileSink(tmp.name, "bench")], interval_s, mon._sample)
    return mon, exporter, tmp


def main(args) -> int:
    import torch

    from hpcllm.comm import DistConfig, init_comm
    from hpcllm.model import ModelConfig, build_model
    from hpcllm.parallel.plans import Plan
    from hpcllm.train.config import TrainConfig
    from hpcllm.train.trainer import TrainStep

    torch.set_num_threads(1)
    costs = hook_costs(args.ranks)
    comm = init_comm(DistConfig(backend="single", device=args.device))
    cfg = ModelConfig(size=args.model, vocab_size=258).resolve()
    model = build_model(cfg).init_weights(0).to(comm.device)
    plan = Plan(model, model.configure_optimizer(0.1, 1e-4), comm, bucket_mb=4.0)  # data parallel, one rank
    tc = TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len, dtype="fp32")
    run_step = TrainStep(model, plan, comm, tc, accum=1)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 258, (args.batch_size, args.seq_len + 1), generator=g).to(comm.device)

    def batch():
        return x[:, :-1], x[:, 1:]

    mon, exporter, tmp = _monitor(args.ranks, args.interval)
    rec = dict(step=1, loss=2.0, lr=1e-4, tokens_per_s=1e4, dt_s=1.0, mfu=None)
    times = {"off": [], "on": []}
    step = 0
    for _ in range(2):  # warm-up
        run_step(batch, 1, 0)
    exporter.start()
    try:
        for r in range(args.rounds):
            for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                t0 = time.perf_counter()
                for i in range(args.steps):
                    step += 1
                    loss, _ = run_step(batch, step, 0)
                    if mode == "on":
                        mon.train_step(step)
                        if step % args.log_interval == 0:
                            mon.train_logged(comm, rec, run_step.t_data, run_step.t_compute, 0.0, args.log_interval)
                if comm.device.type == "cuda":
                    torch.cuda.synchronize()
                times[mode].append((time.perf_counter() - t0) / args.steps)
    finally:
        exporter.stop()
        tmp.cleanup()
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    per_step = costs["step_hook_s"] + costs["log_hook_s"] / args.log_interval
    overhead = per_step / off + costs["export_s"] / 15.0
    print(f"model {args.model} batch {args.batch_size}x{args.seq_len} on {comm.device}: step {off * 1e3:.1f} ms")
    print(f"hooks: step {costs['step_hook_s'] * 1e9:.0f} ns, log step {costs['log_hook_s'] * 1e6:.1f} us "
          f"(every {args.log_interval}), export of {args.ranks} ranks' series {costs['export_s'] * 1e3:.2f} ms")
    print(f"overhead at the defaults (export every 15 s): {overhead * 100:.4f}% of a step")
    print(f"A/B, exporter every {args.interval:g} s: on/off step time {on / off:.4f} "
          f"(median of {args.rounds} rounds of {args.steps} steps; noise included)")
    return 0
