"""Commands of the inference engine: bench infer (`hpcllm infer` is a job: hpcllm.jobs)."""

from __future__ import annotations


def register(sub, bench) -> None:
    p = bench.add_parser("infer", help="generation tokens/s beside HF transformers generate()")
    p.add_argument("--arch", default="gpt2", help="model family: gpt2 or llama")
    p.add_argument("--model", help="a preset of the family (random weights; default gpt2: small, llama: 100m)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=None,
                   help="new tokens per record (fixed: 64); the chat workload's cap on a record's output (256)")
    p.add_argument("--workload", choices=["fixed", "chat"], default="fixed",
                   help="fixed: equal prompts, a fixed number of new tokens; chat: a shared system prompt, user "
                        "parts and output lengths that vary as real ones do (hpcllm/bench/infer_chat.py)")
    p.add_argument("--prompts", type=int, default=64, help="chat: number of prompts")
    p.add_argument("--system-len", type=int, default=256, help="chat: tokens of the shared system prompt")
    p.add_argument("--user-len", type=int, default=48, help="chat: median tokens of a user part")
    p.add_argument("--median-new", type=int, default=32, help="chat: median new tokens of a record")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed rounds after one untimed run of each, median reported (fixed: 3, chat: 1)")
    p.add_argument("--quantize", choices=["none", "int8", "int4"], default="none",
                   help="also time hpcllm with weights quantized so (beside its own full-precision figure)")
    p.add_argument("--hf-static-cache", action="store_true",
                   help="also time HF generate with its static KV cache (always on cuda)")
    p.set_defaults(func=_bench)


def _bench(args) -> int:
    from hpcllm.bench.infer import main

    return main(args)
