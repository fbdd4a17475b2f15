"""`hpcllm plan SPEC --world N`: the dry run of a parallel plan — the device mesh, which rank holds
and reads what, and the memory each rank needs — for a world you may not have, without starting
anything. It imports no torch (a login node's command): the model is counted from its config
(hpcllm.model.shapes), the GPU's memory asked of the CUDA driver."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path


def register(sub, bench) -> None:
    from hpcllm.cli import add_spec_args
    from hpcllm.launch.cli import intermixed_parser

    p = intermixed_parser(sub, "plan", help="dry run of a train spec's parallel plan on N ranks: mesh, holdings, memory")
    add_spec_args(p)
    p.add_argument("--world", type=int, help="ranks to plan for (default: the spec's slurm.nodes x tasks_per_node)")
    p.add_argument("--memory-per-rank", type=parse_bytes, metavar="SIZE",
                   help="each rank's device memory, e.g. 80GiB or 40GB (default: this machine's GPU, if it has one): "
                        "says whether each stage fits, with the margin, and what to change if not (exit 2)")
    p.set_defaults(func=_plan)


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'80GiB', '40GB', '512MiB', '1.5TiB' -> bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size (e.g. 80GiB, 40GB, 512MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def model_for_plan(spec):
    """The parameter shapes (hpcllm.model.shapes.ModelShapes) of the spec's model: from model.init's
    config.json, or the model section with the vocabulary of the dataset (when it is prepared) or
    model.vocab_size."""
    from hpcllm.errors import ConfigError
    from hpcllm.model.shapes import parameter_shapes

    if spec.model.init:
        from hpcllm.model.hf_config import read_config

        _, cfg = read_config(spec.model.init)
    else:
        vocab = spec.model.vocab_size
        if vocab is None and spec.data.dataset and Path(spec.data.dataset).exists():
            from hpcllm.data.shards import open_token_manifest

            vocab = open_token_manifest(spec.data.dataset)["vocab_size"]
        try:
            cfg = spec.model.resolve(vocab)
        except ValueError as e:
            raise ConfigError(f"model: {e} (set model.vocab_size to plan before the data is prepared)") from None
    return parameter_shapes(cfg)


def describe(spec, world: int, memory_per_rank: int | None = None) -> str:
    from hpcllm.errors import ConfigError
    from hpcllm.parallel.layout import check_model
    from hpcllm.parallel.estimate import estimate_memory, holdings

    pc, tc = spec.parallel, spec.train
    try:
        dp, accum = pc.micro_batches(tc, world)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model = model_for_plan(spec)
    cfg = model.config
    try:
        check_model(pc, cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    tp, pp = pc.tp, pc.pp
    mesh = f"pp={pp} x dp={dp} x tp={tp}" if pp > 1 else f"dp={dp} x tp={tp}"
    interleaved = f" ({pc.pp_schedule}, {pc.virtual_stages} stages per rank)" if pc.virtual_stages > 1 else ""
    lines = [f"plan of {spec.kind} job '{spec.name}' on {world} rank(s): parallel.shard={pc.shard}, tp={tp}"
             f"{f', pp={pp}{interleaved}' if pp > 1 else ''} -> mesh {mesh} (dist.backend {spec.dist.backend})",
             f"  model: {cfg.arch} {cfg.size}, {model.num_params(False) / 1e6:.1f}M parameters, {cfg.n_layer} layers, "
             f"{cfg.n_head} heads ({cfg.n_kv_head} kv), vocabulary {cfg.vocab_size}"]
    if tp > 1 and pp == 1:
        lines.append(f"  rank r = dp_rank x {tp} + tp_rank: ranks {{0..{tp - 1}}}, {{{tp}..{2 * tp - 1}}}, ... each split "
                     f"the model in {tp}; each tp group reads one data-parallel share of the batch")
    if pp > 1:
        lines += pipeline_lines(model, pc, dp, accum, tc.activation_checkpointing)
    if tp > 1:
        lines.append(f"  tp rank t holds query heads [t*{cfg.n_head // tp}, (t+1)*{cfg.n_head // tp}), kv heads "
                     f"[t*{cfg.n_kv_head // tp}, ...), 1/{tp} of every MLP and of the vocabulary rows; norms whole"
                     + (" (logits split: loss_parallel)" if pc.vocab_parallel else " (logits gathered)"))
        if pc.sequence_parallel:
            lines.append(f"  sequence parallel: norms, dropout and residual adds on {tc.seq_len // tp} of the "
                         f"{tc.seq_len} positions per rank (their activations / {tp}); all-gather before attention "
                         "and the MLP, reduce-scatter after, in place of the allreduces")
        per_node = spec.slurm.tasks_per_node
        if spec.slurm.nodes > 1 and tp > per_node:
            lines.append(f"  WARNING: tp={tp} > slurm.tasks_per_node={per_node}: a tp group spans nodes, its two "
                         "allreduces per layer cross the network")
    if pc.shard != "none" and dp > 1:
        what = "optimizer state" if pc.shard == "optimizer" else "parameters, gradients and optimizer state"
        lines.append(f"  parallel.shard={pc.shard}: {what} sharded over the {dp} data-parallel rank(s)"
                     + (" of each stage" if pp > 1 else ""))
    if tp > 1:
        held = holdings(model)
        lines.append(f"  {sum(h.tp_dim is not None for h in held)} of {len(held)} parameter tensors split over tp")
    global_batch = tc.batch_size * accum * dp
    lines.append(f"  batch: {global_batch} sequences/step = {dp} data-parallel rank(s) x batch {tc.batch_size} x "
                 f"{accum} micro-step(s); {global_batch * tc.seq_len} tokens/step")
    mem = estimate_memory(model, pc.shard, tp, dp, pp, virtual_stages=pc.virtual_stages)
    one = estimate_memory(model, "none", 1, 1)
    total = sum(mem.values())
    of_rank0 = (" of pp rank 0 (rank 0)" if pc.virtual_stages > 1 else " of stage 0 (rank 0)") if pp > 1 else ""
    lines.append(f"  memory per rank{of_rank0} (estimate, fp32 weights + AdamW, "
                 f"activations not included): parameters {_gib(mem['params_bytes'])}, gradients "
                 f"{_gib(mem['grads_bytes'])}, optimizer state {_gib(mem['optimizer_bytes'])}; total {_gib(total)} "
                 f"({total / sum(one.values()):.3g}x of one rank holding everything)")
    if memory_per_rank:
        lines += fit_lines(model, spec, world, dp, accum, memory_per_rank)
    return "\n".join(lines)


def activation_bytes(cfg, tc, pc, dp: int, accum: int, on_gpu: bool) -> int:
    """Activations one rank holds at the peak of a step, estimated as Korthikanti et al. (2022) do for a
    transformer layer with fused attention (no seq^2 scores): 34 x seq x batch x hidden bytes in bf16
    (doubled in fp32), /tp with sequence parallel (about /tp for the matmuls without), a block's input only
    under activation checkpointing (plus one block recomputed); per micro-batch in flight (pp of them
    under 1F1B on its stages' layers, every one of them under GPipe and looped BFS)."""
    import math

    per_layer_elem = tc.seq_len * tc.batch_size * cfg.n_embd
    fp32 = tc.dtype == "fp32" or (tc.dtype == "auto" and not on_gpu)
    width = 4 if fp32 else 2
    layers = math.ceil(cfg.n_layer / pc.pp)
    full = 17 * per_layer_elem * width / pc.tp  # 34 bytes in bf16 = 17 elements
    if tc.activation_checkpointing:
        held = layers * per_layer_elem * width + full
    else:
        held = layers * full
    in_flight = 1 if pc.pp == 1 else (accum if pc.pp_schedule in ("gpipe", "loopedbfs") else min(accum, pc.pp))
    logits = tc.seq_len * tc.batch_size * cfg.vocab_size * 4 / (pc.tp if pc.vocab_parallel else 1)
    return int(held * in_flight + logits)


def runs_on_gpu(spec) -> bool:
    """Whether the job will train on GPUs (then train.dtype auto is bf16): asked for by dist.device or
    slurm.gpus_per_node, or `auto` on a machine with one."""
    if spec.dist.device != "auto":
        return spec.dist.device == "cuda"
    if spec.slurm.gpus_per_node:
        return True
    return _local_gpu_memory() is not None


def fit_lines(model, spec, world: int, dp: int, accum: int, memory: int) -> list[str]:
    """Whether each pipeline rank's state and activations fit in `memory`, the margin, and (when one does
    not) the plans on the same world that would, checked with the same estimates."""
    from hpcllm.parallel.estimate import estimate_memory

    pc, tc, cfg = spec.parallel, spec.train, model.config
    on_gpu = runs_on_gpu(spec)
    act = activation_bytes(cfg, tc, pc, dp, accum, on_gpu)
    worst = max(sum(estimate_memory(model, pc.shard, pc.tp, dp, pc.pp, p, pc.virtual_stages).values())
                for p in range(pc.pp))
    need = worst + act
    head = (f"  fit in {_gib(memory)} per rank: state {_gib(worst)} + activations ~{_gib(act)} (batch {tc.batch_size} "
            f"x seq {tc.seq_len}, {'fp32' if tc.dtype == 'fp32' or not on_gpu and tc.dtype == 'auto' else 'bf16'}"
            f"{', checkpointed' if tc.activation_checkpointing else ''}; estimate) = {_gib(need)}")
    if need <= memory:
        return [head + f": FITS, margin {_gib(memory - need)} ({(memory - need) / memory:.0%}) for buffers, "
                       "allocator slack and the CUDA context"]
    lines = [head + f": DOES NOT FIT, short by {_gib(need - memory)}"]
    options = []
    now = {"parallel.shard": pc.shard, "parallel.tp": pc.tp, "parallel.pp": pc.pp,
           "train.activation_checkpointing": tc.activation_checkpointing}
    for shard, tp, pp, ckpt in _alternatives(pc, cfg, world, tc.activation_checkpointing):
        dp2 = world // (tp * pp)
        pc2 = dataclasses.replace(pc, shard=shard, tp=tp, pp=pp)
        tc2 = dataclasses.replace(tc, activation_checkpointing=ckpt)
        state = max(sum(estimate_memory(model, shard if dp2 > 1 else "none", tp, dp2, pp, p).values()) for p in range(pp))
        total = state + activation_bytes(cfg, tc2, pc2, dp2, max(accum, pp), on_gpu)
        if total <= memory:
            option = {"parallel.shard": shard, "parallel.tp": tp, "parallel.pp": pp,
                      "train.activation_checkpointing": ckpt}
            what = ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in option.items()
                             if v != now[k])
            options.append(f"    {what}: {_gib(total)} per rank")
    if options:
        lines.append(f"  plans on {world} ranks that fit (same estimates; the fewest changes first):")
        lines += options[:5]
    else:
        lines.append(f"  no plan on {world} ranks fits: more ranks (--world), a smaller batch_size or seq_len, or a "
                     "smaller model")
    return lines


def _alternatives(pc, cfg, world: int, checkpointing: bool):
    """(shard, tp, pp, activation checkpointing) on the same world, fewest changes first: the valid
    tp (dividing the heads and the world) and pp (at most n_layer stages) of powers of two."""
    tps = [t for t in (1, 2, 4, 8, 16) if world % t == 0 and cfg.n_head % t == 0 and cfg.n_kv_head % t == 0]
    pps = [p for p in (1, 2, 4, 8, 16, 32) if p <= cfg.n_layer]
    out = []
    for tp in tps:
        for pp in pps:
            if world % (tp * pp):
                continue
            for shard in ("none", "optimizer", "full"):
                if shard != "none" and world // (tp * pp) < 2:
                    continue
                for ckpt in sorted({checkpointing, True}):
                    changes = (shard != pc.shard) + (tp != pc.tp) + (pp != pc.pp) + (ckpt != checkpointing)
                    out.append((changes, tp * pp, shard, tp, pp, ckpt))
    return [o[2:] for o in sorted(out)]



def pipeline_lines(model, pc, dp: int, accum: int, checkpointing: bool = False) -> list[str]:
    """Which layers and ranks each stage has, its memory per rank, the schedule's bubble, and (GPipe,
    looped BFS) that every micro-batch's activations are held at once."""
    from hpcllm.parallel.estimate import estimate_memory, pipeline_bubble
    from hpcllm.parallel.layout import rank_stages, stage_layers

    pp, v, per_stage = pc.pp, pc.virtual_stages, dp * pc.tp
    layers = stage_layers(model.config.n_layer, pp * v)

    def what(stage: int) -> list[str]:
        span = layers[stage]
        span_text = f"layer {span.start}" if len(span) == 1 else f"layers {span.start}..{span.stop - 1}"
        return (["embedding"] if stage == 0 else []) + [span_text] + \
            (["head and loss"] if stage == pp * v - 1 else [])

    if v == 1:
        where = f"stage s on ranks [s*{per_stage}, (s+1)*{per_stage}); the {pp} stages"
    else:
        where = (f"pp rank p on ranks [p*{per_stage}, (p+1)*{per_stage}) runs stages p, p+{pp}, ... ({v} per rank, "
                 f"{pp * v} in all); the {pp} pp ranks")
    lines = [f"  rank r = (pp_rank x {dp} + dp_rank) x {pc.tp} + tp_rank: {where} of a pipeline read the same batches"
             + (f", each stage's layers split over its tp groups of {pc.tp} adjacent ranks" if pc.tp > 1 else "")]
    for p in range(pp):
        total = sum(estimate_memory(model, pc.shard, pc.tp, dp, pp, p, v).values())
        ranks = f"ranks {p * per_stage}..{(p + 1) * per_stage - 1}"
        if v == 1:
            held = ", ".join(what(p))
            lines.append(f"  stage {p} ({ranks}): {held}; {_gib(total)} of weights, gradients and AdamW state per rank")
        else:
            held = "; ".join(f"stage {s}: {', '.join(what(s))}" for s in rank_stages(p, pp, v))
            lines.append(f"  pp rank {p} ({ranks}): {held}; {_gib(total)} of weights, gradients and AdamW state "
                         "per rank")
    bubble = pipeline_bubble(pp, accum, v)
    formula = "(pp-1)/(micro-batches+pp-1)" if v == 1 else \
        f"(pp-1)/({v} x micro-batches+pp-1)" if accum >= pp else f"1 - {v} x micro-batches/({v} x pp+micro-batches-1)"
    lines.append(f"  schedule {pc.pp_schedule}: {accum} micro-batch(es) per step, bubble {formula} "
                 f"= {bubble:.0%} of each step idle per {'stage' if v == 1 else 'pp rank'}"
                 + ("; raise train.global_batch_size for more micro-batches" if bubble > 0.2 else ""))
    if pc.pp_schedule in ("gpipe", "loopedbfs") and accum > pp:
        lines.append(f"  activations: {pc.pp_schedule} holds all {accum} micro-batches' of every stage at once (1f1b and "
                     f"interleaved1f1b about {pp})" + ("" if checkpointing else
                                                       "; train.activation_checkpointing cuts each to its blocks' inputs"))
    return lines


def _plan(args: argparse.Namespace) -> int:
    from hpcllm.config import load_spec
    from hpcllm.errors import ConfigError

    spec = load_spec(args.spec, args.overrides)
    world = args.world or spec.slurm.nodes * spec.slurm.tasks_per_node
    if world < 1:
        raise ConfigError(f"--world must be >= 1, got {world}")
    memory = args.memory_per_rank or _local_gpu_memory()
    text = describe(spec, world, memory)
    print(text)
    if "DOES NOT FIT" in text:
        raise ConfigError(f"the plan does not fit in {_gib(memory)} per rank (see above: what to change)")
    if not memory:
        print("  (pass --memory-per-rank SIZE, e.g. 80GiB, to check that each rank's part fits)")
    if spec.kind == "train":
        nodes = -(-world // spec.slurm.tasks_per_node) if args.world else spec.slurm.nodes
        print("\n".join(interval_lines(spec, nodes)))
    return 0


def interval_lines(spec, nodes: int) -> list[str]:
    """The checkpoint interval advice (hpcllm.report.interval) on `nodes` nodes, with the save and step
    times the spec's run_dir measured, when it has run."""
    from hpcllm.errors import HpcllmError
    from hpcllm.report.interval import advice_for, advice_lines

    fig, note = {}, []
    if (Path(spec.run_dir) / "provenance.jsonl").is_file():
        from hpcllm.report.report import build_report

        try:
            rep = build_report(spec.run_dir, use_sacct=False)
        except HpcllmError as e:
            rep, note = {}, [f"  (run_dir's records not read: {e})"]
        if rep.get("kind") == "train":
            fig = dict(rep["checkpoint_interval"]["figures"])
            note = [f"  (save, step and restart times as measured in {spec.run_dir}, on its rank count)"]
    fig.update(ckpt_interval=spec.train.ckpt_interval, max_steps=spec.train.max_steps)
    return advice_lines(advice_for(fig, nodes, spec.train.node_mtbf_hours or None), this="the spec") + note


def _local_gpu_memory() -> int | None:
    """The memory of this machine's first visible GPU (CUDA_VISIBLE_DEVICES applies), in bytes, or None
    without one: asked of the CUDA driver itself (libcuda), which gives the figure torch's
    `get_device_properties(0).total_memory` reports, without importing torch."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:  # no NVIDIA driver: no GPU
        return None
    count, device, total = ctypes.c_int(), ctypes.c_int(), ctypes.c_size_t()
    ok = (cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
          and cuda.cuDeviceGet(ctypes.byref(device), 0) == 0
          and cuda.cuDeviceTotalMem_v2(ctypes.byref(total), device) == 0)
    return total.value if ok else None
