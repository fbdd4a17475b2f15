"""`hpcllm bench infer --workload chat`: a batch job shaped like real ones, hpcllm beside HF generate().

Every prompt is one chat template's system prompt (`--system-len` tokens, a few hundred) followed by
a user part of varied length (log-normal, median `--user-len`), and each record's output has its own
length, long-tailed (log-normal, median `--median-new`, capped at `--new-tokens`) — what stop tokens
do to real outputs, made deterministic so that both engines do the same work on random weights.

HF generate() gets its best settings: prompts sorted by length and cut into batches of the same
size, left-padded, each batch run until its longest row is done (what a batch does when its rows
stop at different tokens), with its dynamic and its static KV cache; hpcllm runs every prompt
through one engine, with prefix sharing on and off. Each runs one batch of a few tokens untimed
first (first calls allocate; HF sets up its static cache), then `--rounds` timed runs of the whole
workload, alternating. Tokens are compared record by record (the first
n of HF's row, n the record's length). Printed: new tokens/s, the ratio to HF's faster cache, and
the KV cache's bytes per token in flight, hpcllm's paged pool against a static cache's.
"""

from __future__ import annotations

import random
import statistics

import torch


def workload(n: int, vocab: int, system_len: int, user_len: int, median_new: int, max_new: int, seed: int = 0):
    """(prompts, per-record output lengths)."""
    rng = random.Random(seed)
    system = [rng.randrange(1, vocab) for _ in range(system_len)]
    prompts, budgets = [], []
    for _ in range(n):
        u = min(4 * user_len, max(4, round(rng.lognormvariate(0, 0.6) * user_len)))
        prompts.append(system + [rng.randrange(1, vocab) for _ in range(u)])
        budgets.append(min(max_new, max(1, round(rng.lognormvariate(0, 0.8) * median_new))))
    return prompts, budgets


def hf_batches(prompts: list[list[int]], budgets: list[int], batch_size: int) -> list[list[int]]:
    """What a careful HF user runs: indices sorted by prompt length (longest first), in batches."""
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def hf_generate(hf, prompts, budgets, batch_size: int, dev, **cache) -> list[list[int]]:
    out: list[list[int] | None] = [None] * len(prompts)
    for idx in hf_batches(prompts, budgets, batch_size):
        L = max(len(prompts[i]) for i in idx)
        ids = torch.zeros((len(idx), L), dtype=torch.long)
        att = torch.zeros((len(idx), L), dtype=torch.long)
        for j, i in enumerate(idx):
            ids[j, L - len(prompts[i]):] = torch.tensor(prompts[i])
            att[j, L - len(prompts[i]):] = 1
        new = max(budgets[i] for i in idx)  # the batch runs until its longest row is done
        with torch.no_grad():
            gen = hf.generate(ids.to(dev), attention_mask=att.to(dev), do_sample=False, max_new_tokens=new,
                              min_new_tokens=new, pad_token_id=0, **cache)
        for j, i in enumerate(idx):
            out[i] = gen[j, L : L + budgets[i]].tolist()
    return out  # type: ignore[return-value]


def static_bytes_per_token(prompts, budgets, batch_size: int, per_token: int) -> float:
    """A static cache's bytes per token in flight, averaged over decode steps: each batch holds
    rows x (longest prompt + longest output) from its first step to its last."""
    ratios = []
    for idx in hf_batches(prompts, budgets, batch_size):
        L, new = max(len(prompts[i]) for i in idx), max(budgets[i] for i in idx)
        allocated = len(idx) * (L + new) * per_token
        for step in range(new):
            live = sum(len(prompts[i]) + step + 1 for i in idx if step < budgets[i])
            ratios.append(allocated / live)
    return statistics.mean(ratios)


def run(args, model, hf, dev, dtype, make_engine, timed) -> None:
    prompts, budgets = workload(args.prompts, model.config.vocab_size, args.system_len, args.user_len,
                                args.median_new, args.new_tokens)
    from hpcllm.infer.sampling import SamplingParams

    greedy = SamplingParams(max_new_tokens=args.new_tokens)
    engines = {"hpcllm, prefix sharing": make_engine(True), "hpcllm, no sharing": make_engine(False)}
    quant = getattr(args, "quantize", "none")
    if quant != "none":
        engines[f"hpcllm, prefix sharing, {quant}"] = make_engine(True, quantized=True)

    def ours(engine):
        def fn(ps, bs):
            if engine.pool is not None:  # every round starts cold: no prefix left by the last one
                engine.pool.forget_prefixes()
            return [r.tokens for r in engine.generate(ps, list(range(len(ps))), greedy, max_new_tokens=bs)]

        return fn

    impls = {name: ours(e) for name, e in engines.items()}
    impls["HF generate()"] = lambda ps, bs: hf_generate(hf, ps, bs, args.batch_size, dev)
    impls["HF generate(), static cache"] = lambda ps, bs: hf_generate(hf, ps, bs, args.batch_size, dev,
                                                                      cache_implementation="static")
    # untimed: one batch of a few tokens each (first calls allocate, HF's static cache is set up)
    for fn in impls.values():
        fn(prompts[: args.batch_size], [min(b, 4) for b in budgets[: args.batch_size]])
    times: dict[str, list[float]] = {k: [] for k in impls}
    first, stats = {}, {}
    for _ in range(args.rounds):
        for k, fn in impls.items():
            got = []
            times[k].append(timed(lambda: got.append(fn(prompts, budgets))))  # (called at once, in this iteration)
            first.setdefault(k, got[0])
            if k in engines:
                stats.setdefault(k, engines[k].stats)  # of the first timed round
    new = sum(budgets)
    tps = {k: new / statistics.median(v) for k, v in times.items()}
    c = model.config
    per_token = 2 * c.n_layer * c.n_kv_head * c.head_dim * torch.empty((), dtype=dtype).element_size()
    users = sorted(len(p) - args.system_len for p in prompts)
    print(f"# hpcllm bench infer --workload chat: {args.arch} {args.model_name} ({model.num_params() / 1e6:.1f}M), "
          f"{dev}, {str(dtype)[6:]}, batch {args.batch_size}, {len(prompts)} prompts: system {args.system_len} + "
          f"user {users[0]}..{users[-1]} (median {users[len(users) // 2]}) tokens, outputs "
          f"{min(budgets)}..{max(budgets)} (median {sorted(budgets)[len(budgets) // 2]}, total {new}) new tokens, "
          f"greedy, median of {args.rounds} after a short untimed run of each")
    import transformers

    for k, v in tps.items():
        peer = f"   (transformers {transformers.__version__})" if k.startswith("HF") else ""
        print(f"  {k:<28} {v:>10,.1f} new tokens/s{peer}")
    mine = first["hpcllm, prefix sharing"]
    for k in [k for k in impls if k != "hpcllm, prefix sharing"]:
        same = sum(a == b for a, b in zip(mine, first[k]))
        why = "other weights: on random ones every logit is a near-tie" if k.endswith(quant) and quant != "none" \
            else "greedy; the rest differ at a float tie"
        print(f"  {k}: {same}/{len(mine)} records' tokens equal to hpcllm's ({why})")
    best = max(tps["HF generate()"], tps["HF generate(), static cache"])
    for k in engines:
        print(f"  ratio {k} / HF generate() (faster cache)  {tps[k] / best:.2f}x")
    if quant != "none":
        k = f"hpcllm, prefix sharing, {quant}"
        print(f"  ratio {k} / hpcllm, prefix sharing  {tps[k] / tps['hpcllm, prefix sharing']:.2f}x")
    for k, s in stats.items():
        print(f"  {k}: {s.reused_tokens}/{s.prompt_tokens} prompt tokens from the pool, {s.prefill_forwards} prefill "
              f"forwards, {s.decode_steps} decode steps; KV cache peak {s.peak_cache_bytes / 2**20:.1f} MiB, "
              f"{s.cache_bytes_per_token / per_token:.2f}x a token's keys and values per token in flight")
    static = static_bytes_per_token(prompts, budgets, args.batch_size, per_token)
    L = max(len(p) for p in prompts) + args.new_tokens
    print(f"  a static cache (HF's): {args.batch_size * L * per_token / 2**20:.1f} MiB for batch x "
          f"(longest prompt + most new tokens), {static / per_token:.2f}x a token's keys and values per token in flight")
