"""The engine on every llama-family model against transformers: greedy generation token-identical to
`generate(do_sample=False)` over 20 prompts of 1-200 tokens in left-padded batches, and scores
within 1e-4 — random weights saved by `save_pretrained` in several shards; no download."""

import pytest
import torch

from hpcllm.infer.engine import Engine
from hpcllm.infer.sampling import SamplingParams
from hpcllm.model import load_hf_model
from tests.model.test_llama import FAMILIES, V, make_hf

transformers = pytest.importorskip("transformers")
NEW = 8


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf = make_hf(request.param, seed=11)
    hf.save_pretrained(d, max_shard_size="100KB")
    ours, _ = load_hf_model(d)
    return hf, ours.eval()


def prompts(n, seed, lo=1, hi=200):
    g = torch.Generator().manual_seed(seed)
    lens = [lo, hi] + torch.randint(lo, hi + 1, (n - 2,), generator=g).tolist()
    return [torch.randint(0, V, (k,), generator=g).tolist() for k in lens]


def test_greedy_is_token_identical_to_hf_generate(pair):
    hf, ours = pair
    ps = prompts(20, seed=5)
    res = Engine(ours, max_batch_size=8).generate(ps, list(range(20)), SamplingParams(max_new_tokens=NEW))
    for i, (p, r) in enumerate(zip(ps, res)):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0,
                              eos_token_id=None)
        assert r.tokens == ref[0, len(p):].tolist(), (i, len(p))


def test_scores_match_hf_log_probs(pair):
    hf, ours = pair
    ps, cs = prompts(10, seed=6, hi=150), prompts(10, seed=7, lo=1, hi=40)
    res = Engine(ours, max_batch_size=4).score(ps, cs, list(range(10)))
    for p, c, r in zip(ps, cs, res):
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([p + c])).logits[0].double(), -1)
        want = sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(c))
        assert r.n_tokens == len(c) and abs(r.logprob_sum - want) <= 1e-4, (len(p), len(c))


def test_the_kv_cache_follows_what_rows_hold_not_the_context():
    """A 131k-context model serves short prompts with a small pool of blocks (Llama 3.2 1B at batch
    256 would need 137 GB for its whole context); longer prompts grow it, with the same results as a
    fresh engine, and the larger pool serves shorter prompts again."""
    from hpcllm.model import ModelConfig, build_model

    cfg = ModelConfig(arch="llama", size="custom", n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ffn_dim=64,
                      block_size=131072).resolve(V)
    model = build_model(cfg).init_weights(0).eval()
    engine = Engine(model, max_batch_size=4)
    assert engine.cache is None
    short, long = prompts(6, seed=8, hi=40), prompts(3, seed=9, lo=150, hi=200)
    params = SamplingParams(max_new_tokens=6)
    first = engine.generate(short, list(range(6)), params)
    # scratch block + 8 blocks of 16 tokens a row: (layer, block, slot, kv head, dim)
    assert engine.cache.k.shape == (2, 33, 16, 2, 8)
    # 4 rows of <= 46 tokens hold at most 12 blocks
    assert engine.stats.peak_cache_bytes <= 12 * engine.cache.bytes_per_block
    grown = engine.generate(long, list(range(3)), params)
    assert engine.cache.n_blocks == 66  # 3 rows of up to 206 tokens (13 blocks each) need more than 32: doubled
    again = engine.generate(short, list(range(6)), params)
    fresh = Engine(model, max_batch_size=4)
    assert [r.tokens for r in grown] == [r.tokens for r in fresh.generate(long, list(range(3)), params)]
    assert [r.tokens for r in again] == [r.tokens for r in first]


def shared_prompts(n, seed, system=40):
    """A chat template's system prompt (40 tokens: two full blocks of 16) and user parts of 1-30."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(0, V, (system,), generator=g).tolist()
    return [head + torch.randint(0, V, (int(k),), generator=g).tolist() for k in torch.randint(1, 31, (n,), generator=g)]


def test_shared_prefixes_and_refilled_rows_keep_hf_generate_greedy_tokens(pair):
    """Rows end at their own lengths and the next prompt takes a finished row's place at once; the
    system prompt's blocks are computed once and read by every row: the tokens stay HF's."""
    hf, ours = pair
    ps = shared_prompts(12, seed=12)
    budgets = [1 + (7 * i) % 12 for i in range(12)]
    engine = Engine(ours, max_batch_size=4)
    res = engine.generate(ps, list(range(12)), SamplingParams(max_new_tokens=12), max_new_tokens=budgets)
    assert engine.stats.reused_tokens == 11 * 32, engine.stats  # every prompt but the first
    # a static batch runs until its longest row is done; refilled rows leave none idle but the tail's
    static = sum(max(budgets[i : i + 4]) - 1 for i in range(0, 12, 4))
    assert engine.stats.decode_steps <= -(-sum(b - 1 for b in budgets) // 4) + max(budgets) - 1 < static
    for i, (p, b, r) in enumerate(zip(ps, budgets, res)):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=b, min_new_tokens=b, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert r.tokens == ref[0, len(p):].tolist() and r.finish_reason == "length", (i, len(p), b)


def test_one_document_scored_many_ways_computes_it_once_and_keeps_hf_log_probs(pair):
    hf, ours = pair
    doc = shared_prompts(1, seed=13, system=70)[0]
    conts = prompts(6, seed=14, lo=1, hi=12)
    engine = Engine(ours, max_batch_size=4)
    res = engine.score([doc] * 6, conts, list(range(6)))
    usable = (len(doc) - 1) // 16 * 16  # full blocks before the last prompt token
    assert engine.pool.reused_tokens == 5 * usable > 0
    for c, r in zip(conts, res):
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([doc + c])).logits[0].double(), -1)
        want = [logp[len(doc) - 1 + j, t].item() for j, t in enumerate(c)]
        assert r.n_tokens == len(c) and max(abs(a - b) for a, b in zip(r.token_logprobs, want)) <= 1e-4
