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


def test_the_kv_cache_is_sized_by_the_prompts_not_the_context():
    """A 131k-context model serves short prompts with a short cache (Llama 3.2 1B at batch 256 would
    need 137 GB for its whole context); a longer batch grows it, with the same results as a fresh engine."""
    from hpcllm.model import ModelConfig, build_model

    cfg = ModelConfig(arch="llama", size="custom", n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ffn_dim=64,
                      block_size=131072).resolve(V)
    model = build_model(cfg).init_weights(0).eval()
    engine = Engine(model, max_batch_size=4)
    assert engine.cache is None
    short, long = prompts(6, seed=8, hi=40), prompts(3, seed=9, lo=150, hi=200)
    params = SamplingParams(max_new_tokens=6)
    first = engine.generate(short, list(range(6)), params)
    assert engine.cache.max_len == 128 and engine.cache.k.shape == (2, 4, 2, 128, 8)
    grown = engine.generate(long, list(range(3)), params)
    assert engine.cache.max_len == 256
    again = engine.generate(short, list(range(6)), params)  # the larger cache serves shorter batches too
    fresh = Engine(model, max_batch_size=4)
    assert [r.tokens for r in grown] == [r.tokens for r in fresh.generate(long, list(range(3)), params)]
    assert [r.tokens for r in again] == [r.tokens for r in first]
