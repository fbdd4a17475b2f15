"""`hpcllm bench infer`: generation tokens/s of hpcllm's engine beside HF transformers' generate().

Same random GPT-2-shaped weights (exported to HF format and loaded by GPT2LMHeadModel), same prompts
(equal length, so HF needs no padding), same batch, greedy, a fixed number of new tokens; rounds
alternate and the median is reported.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from hpcllm.errors import HpcllmError


def main(args) -> int:
    try:
        import transformers
    except ImportError:
        raise HpcllmError("bench infer needs transformers (pip install -e '.[bench]')") from None
    from hpcllm.infer.engine import Engine
    from hpcllm.infer.sampling import SamplingParams
    from hpcllm.model import GPT, ModelConfig, save_hf_gpt2

    dev = torch.device(args.device)
    cfg = ModelConfig(size=args.model).resolve(50304 if args.model.startswith("gpt2") else 258)
    model = GPT(cfg).init_weights(0).eval()
    with tempfile.TemporaryDirectory() as d:
        save_hf_gpt2(model, d)
        hf = transformers.GPT2LMHeadModel.from_pretrained(d).to(dev).eval()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    hf = hf.to(dtype)
    engine = Engine(model, device=dev, dtype=dtype, max_batch_size=args.batch_size, use_cuda_graphs=dev.type == "cuda")
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (args.batch_size, args.prompt_len), generator=g)
    params = SamplingParams(max_new_tokens=args.new_tokens)
    ids = list(range(args.batch_size))
    new = args.batch_size * args.new_tokens

    def ours():
        engine.generate(prompts.tolist(), ids, params)

    def theirs():
        with torch.no_grad():
            hf.generate(prompts.to(dev), attention_mask=torch.ones_like(prompts).to(dev), do_sample=False,
                        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0)

    def timed(fn):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for fn in (ours, theirs):
        fn()
    t_ours, t_hf = [], []
    for _ in range(3):
        t_ours.append(timed(ours))
        t_hf.append(timed(theirs))
    a, b = new / statistics.median(t_ours), new / statistics.median(t_hf)
    print(f"# hpcllm bench infer: model {args.model} ({model.num_params() / 1e6:.1f}M), {dev}, {str(dtype)[6:]}, "
          f"batch {args.batch_size}, prompt {args.prompt_len} + {args.new_tokens} new tokens, greedy, median of 3")
    print(f"  hpcllm engine        {a:>10,.0f} new tokens/s")
    print(f"  HF generate()        {b:>10,.0f} new tokens/s   (transformers {transformers.__version__})")
    print(f"  ratio hpcllm / HF    {a / b:.2f}x")
    return 0
