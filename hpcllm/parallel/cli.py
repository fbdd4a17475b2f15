"""`hpcllm plan SPEC --world N`: the dry run of a parallel plan — the device mesh, which rank holds
and reads what, and the memory each rank needs — for a world you may not have, without starting
anything (the model is built on the meta device)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub, bench) -> None:
    from hpcllm.cli import add_spec_args
    from hpcllm.launch.cli import intermixed_parser

    p = intermixed_parser(sub, "plan", help="dry run of a train spec's parallel plan on N ranks: mesh, holdings, memory")
    add_spec_args(p)
    p.add_argument("--world", type=int, help="ranks to plan for (default: the spec's slurm.nodes x tasks_per_node)")
    p.set_defaults(func=_plan)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def model_for_plan(spec):
    """The spec's model on the meta device: from model.init's config.json, or the model section with
    the vocabulary of the dataset (when it is prepared) or model.vocab_size."""
    import torch

    from hpcllm.errors import ConfigError
    from hpcllm.model import build_model

    if spec.model.init:
        from hpcllm.model.hf import read_config

        _, cfg = read_config(spec.model.init)
    else:
        vocab = spec.model.vocab_size
        if vocab is None and spec.data.dataset and Path(spec.data.dataset).exists():
            from hpcllm.data import open_dataset

            vocab = open_dataset(spec.data.dataset).vocab_size
        try:
            cfg = spec.model.resolve(vocab)
        except ValueError as e:
            raise ConfigError(f"model: {e} (set model.vocab_size to plan before the data is prepared)") from None
    with torch.device("meta"):
        return build_model(cfg)


def describe(spec, world: int) -> str:
    from hpcllm.errors import ConfigError
    from hpcllm.parallel.config import check_model
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
    return "\n".join(lines)


def pipeline_lines(model, pc, dp: int, accum: int, checkpointing: bool = False) -> list[str]:
    """Which layers and ranks each stage has, its memory per rank, the schedule's bubble, and (GPipe,
    looped BFS) that every micro-batch's activations are held at once."""
    from hpcllm.parallel.estimate import estimate_memory, pipeline_bubble
    from hpcllm.parallel.stages import rank_stages, stage_layers

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
    print(describe(spec, world))
    return 0
