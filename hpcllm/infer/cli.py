"""Commands of the inference engine: bench infer (`hpcllm infer` is a job: hpcllm.jobs)."""

from __future__ import annotations


def register(sub, bench) -> None:
    p = bench.add_parser("infer", help="generation tokens/s beside HF transformers generate()")
    p.add_argument("--arch", default="gpt2", help="model family: gpt2 or llama")
    p.add_argument("--model", help="a preset of the family (random weights; default gpt2: small, llama: 100m)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after one untimed run of each (median)")
    p.add_argument("--hf-static-cache", action="store_true",
                   help="also time HF generate with its static KV cache (always on cuda)")
    p.set_defaults(func=_bench)


def _bench(args) -> int:
    from hpcllm.bench.infer import main

    return main(args)
