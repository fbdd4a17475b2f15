"""Commands of the inference job: infer SPEC, infer export RUN_DIR --jsonl OUT, bench infer."""

from __future__ import annotations

from hpcllm.errors import ConfigError


def register(sub, bench) -> None:
    p = sub.add_parser("infer", help="batched generation/scoring over prompt shards; or `infer export RUN_DIR --jsonl F`")
    p.add_argument("spec", help="job spec (YAML), or 'export'")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override a spec value (export: RUN_DIR)")
    p.add_argument("--jsonl", help="export: the JSONL file to write")
    p.set_defaults(func=_infer)

    p = bench.add_parser("infer", help="generation tokens/s beside HF transformers generate()")
    p.add_argument("--model", default="small", help="model preset (random weights)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--hf-static-cache", action="store_true",
                   help="also time HF generate with its static KV cache (always on cuda)")
    p.set_defaults(func=_bench)


def _infer(args) -> int:
    if args.spec == "export":
        from hpcllm.infer.job import export_jsonl

        if len(args.overrides) != 1 or not args.jsonl:
            raise ConfigError("usage: hpcllm infer export RUN_DIR --jsonl OUT.jsonl")
        n = export_jsonl(args.overrides[0], args.jsonl)
        print(f"wrote {n} records to {args.jsonl}")
        return 0
    from hpcllm import runtime
    from hpcllm.config import load_spec
    from hpcllm.infer.job import run_infer

    spec = load_spec(args.spec, args.overrides)
    if spec.kind != "infer":
        raise ConfigError(f"{args.spec}: kind is '{spec.kind}', `hpcllm infer` runs kind: infer")
    comm = runtime.start(spec)
    try:
        run_infer(spec, comm)
    finally:
        comm.close()
    return 0


def _bench(args) -> int:
    from hpcllm.bench.infer import main

    return main(args)
