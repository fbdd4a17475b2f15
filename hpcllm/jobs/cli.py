"""The job commands — `hpcllm prepare|train|infer SPEC [key=value ...]` — and `hpcllm demo`.

Each runs its kind's `run` on every rank (one process, mpirun or srun): the same function that the
submitit runner and the rendered sbatch scripts call.
"""

from __future__ import annotations

from hpcllm.errors import ConfigError


def register(sub, bench) -> None:
    from hpcllm.cli import add_spec_args
    from hpcllm.jobs import kind_names
    from hpcllm.jobs.kind import get_kind

    for name in kind_names():
        p = sub.add_parser(name, help=get_kind(name).help)
        add_spec_args(p)
        if name == "prepare":
            p.add_argument("--prompts", action="store_true", help="write prompt shards (same as data.output=prompts)")
        if name == "infer":
            p.add_argument("--jsonl", help="with `infer export RUN_DIR`: the JSONL file to write")
            p.add_argument("--force", action="store_true",
                           help="replace outputs in run_dir that other settings made (else refused)")
        p.set_defaults(func=_run_job, kind=name)

    p = sub.add_parser("demo", help="the embedded default: prepare stdlib sources, train on 2 ranks, plot, sample")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override the demo's train spec")
    p.set_defaults(func=_demo)


def _run_job(args) -> int:
    from hpcllm.config import load_spec
    from hpcllm.jobs.kind import get_kind

    if args.kind == "infer" and args.spec == "export":
        return _export(args)
    overrides = list(args.overrides) + (["data.output=prompts"] if getattr(args, "prompts", False) else [])
    spec = load_spec(args.spec, overrides)
    if spec.kind != args.kind:
        raise ConfigError(f"{args.spec}: kind is '{spec.kind}', `hpcllm {args.kind}` runs kind: {args.kind}")
    extra = {"force": True} if getattr(args, "force", False) else {}  # infer --force: this run only
    return get_kind(spec.kind).run(spec, **extra)


def _export(args) -> int:
    from hpcllm.infer.job import export_jsonl

    if len(args.overrides) != 1 or not args.jsonl:
        raise ConfigError("usage: hpcllm infer export RUN_DIR --jsonl OUT.jsonl")
    n = export_jsonl(args.overrides[0], args.jsonl)
    print(f"wrote {n} records to {args.jsonl}")
    return 0


def _demo(args) -> int:
    from hpcllm.jobs.demo import run_demo

    return run_demo(args.ranks, args.run_dir, args.overrides)
