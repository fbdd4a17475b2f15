"""`hpcllm bench infer`: generation tokens/s of hpcllm's engine beside HF transformers' generate().

Same random weights of any family (`--arch gpt2|llama`, a preset of it with `--model`), exported to
an HF directory and loaded by transformers' AutoModelForCausalLM. `--workload fixed`: same prompts
(equal length, so HF needs no padding), same batch, greedy, a fixed number of new tokens. `--workload
chat`: a batch job shaped like real ones (hpcllm/bench/infer_chat.py). After one untimed run of
each, rounds alternate (`--rounds`) and the median is reported.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from hpcllm.errors import HpcllmError


def main(args) -> int:
    chat = getattr(args, "workload", "fixed") == "chat"
    if getattr(args, "rounds", None) is None:
        args.rounds = 1 if chat else 3
    if getattr(args, "new_tokens", None) is None:
        args.new_tokens = 256 if chat else 64
    rounds = args.rounds
    for key in ("rounds", "new_tokens", "batch_size", "prompt_len", "prompts", "system_len", "user_len", "median_new"):
        if getattr(args, key, 1) < 1:
            raise HpcllmError(f"bench infer: --{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if rounds < 1:
        raise HpcllmError(f"bench infer: --rounds must be >= 1, got {rounds}")
    try:
        import transformers
    except ImportError:
        raise HpcllmError("bench infer needs transformers (pip install -e '.[bench]')") from None
    from hpcllm.infer.engine import Engine
    from hpcllm.infer.sampling import SamplingParams
    from hpcllm.model import ModelConfig, build_model, save_hf_model

    dev = torch.device(args.device)
    model_name = args.model or {"gpt2": "small", "llama": "100m"}.get(args.arch, "tiny")
    vocab = 50304 if model_name.startswith("gpt2") else 32000 if args.arch == "llama" else 258
    try:
        cfg = ModelConfig(arch=args.arch, size=model_name).resolve(vocab)
    except ValueError as e:
        raise HpcllmError(f"bench infer: {e}") from None
    model = build_model(cfg).init_weights(0).eval()
    with tempfile.TemporaryDirectory() as d:
        save_hf_model(model, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d).to(dev).eval()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    hf = hf.to(dtype)
    quant = getattr(args, "quantize", "none")
    qmodel = None
    if quant != "none":  # a copy: HF and hpcllm's full-precision figure keep the full weights
        import copy

        from hpcllm.infer.quantize import check_supported, quantize_model

        check_supported(quant, dev)
        qmodel = quantize_model(copy.deepcopy(model), quant, dev)

    def make_engine(share_prefixes: bool = True, quantized: bool = False):
        return Engine(qmodel if quantized else model, device=dev, dtype=dtype, max_batch_size=args.batch_size,
                      use_cuda_graphs=dev.type == "cuda", share_prefixes=share_prefixes)

    def timed(fn):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    if chat:
        from hpcllm.bench.infer_chat import run

        args.model_name = model_name
        run(args, model, hf, dev, dtype, make_engine, timed)
        return 0
    engine = make_engine()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (args.batch_size, args.prompt_len), generator=g)
    params = SamplingParams(max_new_tokens=args.new_tokens)
    ids = list(range(args.batch_size))
    new = args.batch_size * args.new_tokens

    def ours():
        return [r.tokens for r in engine.generate(prompts.tolist(), ids, params)]

    def hf_generate(**cache):
        def theirs():
            with torch.no_grad():
                out = hf.generate(prompts.to(dev), attention_mask=torch.ones_like(prompts).to(dev), do_sample=False,
                                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0,
                                  **cache)
            return out[:, args.prompt_len:].tolist()

        return theirs

    # on a GPU HF's fastest path is its static (preallocated, compilable) KV cache: the peer to beat
    peers = {"HF generate()": hf_generate()}
    if dev.type == "cuda" or args.hf_static_cache:
        peers["HF generate(), static cache"] = hf_generate(cache_implementation="static")

    impls = {"hpcllm engine": ours} | peers
    if qmodel is not None:
        qengine = make_engine(quantized=True)
        impls[f"hpcllm engine, {quant}"] = lambda: [r.tokens for r in qengine.generate(prompts.tolist(), ids, params)]
    # the warm-up round's outputs: each peer really generated, and the same greedy tokens (a figure for
    # another computation would compare nothing)
    first = {k: fn() for k, fn in impls.items()}
    mine = [t for row in first["hpcllm engine"] for t in row]
    times = {k: [] for k in impls}
    for _ in range(rounds):
        for k, fn in impls.items():
            times[k].append(timed(fn))
    tps = {k: new / statistics.median(v) for k, v in times.items()}
    a = tps["hpcllm engine"]
    print(f"# hpcllm bench infer: {args.arch} {model_name} ({model.num_params() / 1e6:.1f}M), {dev}, {str(dtype)[6:]}, "
          f"batch {args.batch_size}, prompt {args.prompt_len} + {args.new_tokens} new tokens, greedy, "
          f"median of {rounds}")
    print(f"  {'hpcllm engine':<28} {a:>10,.0f} new tokens/s")
    for k in peers:
        print(f"  {k:<28} {tps[k]:>10,.0f} new tokens/s   (transformers {transformers.__version__})")
    for k in peers:
        theirs = [t for row in first[k] for t in row]
        same = sum(a == b for a, b in zip(mine, theirs))
        print(f"  {k}: {len(first[k])} x {len(first[k][0])} new tokens, {same}/{len(mine)} equal to hpcllm's")
    for k in peers:
        print(f"  ratio hpcllm / {k:<28} {a / tps[k]:.2f}x")
    if qmodel is not None:
        k = f"hpcllm engine, {quant}"
        theirs = [t for row in first[k] for t in row]
        same = sum(a == b for a, b in zip(mine, theirs))
        print(f"  {k:<28} {tps[k]:>10,.0f} new tokens/s   {same}/{len(mine)} tokens equal to full precision's "
              f"(random weights: near-ties everywhere; docs/inference.md has the quality on a trained model)")
        print(f"  ratio {k} / hpcllm engine  {tps[k] / a:.2f}x")
    if engine.cuda_graph_fallback:  # the figure above is eager decoding's: say so beside it
        print(f"  CUDA-graph decode fell back to eager: {engine.cuda_graph_fallback}")
    return 0
