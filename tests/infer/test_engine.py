"""The generation/scoring engine against transformers (random GPT-2 weights, no download)."""

import math

import pytest
import torch

from hpcllm.infer.engine import Engine, PromptError
from hpcllm.infer.sampling import SamplingParams
from hpcllm.model import load_hf_model

transformers = pytest.importorskip("transformers")
VOCAB = 300


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=VOCAB, n_positions=64,
                                  resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    d = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(d, safe_serialization=True)
    ours, _ = load_hf_model(d)
    return hf, ours


def prompts(n, seed=1, lo=1, hi=20):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(0, VOCAB, (k,), generator=g).tolist() for k in lens]


def test_greedy_matches_hf_generate(models):
    hf, ours = models
    ps = prompts(7)
    engine = Engine(ours, max_batch_size=4)
    res = engine.generate(ps, list(range(7)), SamplingParams(max_new_tokens=12))
    for p, r in zip(ps, res):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, pad_token_id=0,
                          attention_mask=torch.ones(1, len(p), dtype=torch.long))
        assert r.tokens == ref[0, len(p):].tolist()
        assert r.finish_reason == "length"


def test_score_matches_hf_loss(models):
    hf, ours = models
    ps, cs = prompts(5, seed=2), prompts(5, seed=3, lo=2, hi=9)
    res = Engine(ours, max_batch_size=3).score(ps, cs, list(range(5)))
    for p, c, r in zip(ps, cs, res):
        ids = torch.tensor([p + c])
        labels = ids.clone()
        labels[0, : len(p)] = -100
        with torch.no_grad():
            loss = hf(ids, labels=labels).loss.item()
        assert r.n_tokens == len(c)
        assert abs(r.logprob_sum - (-loss * len(c))) <= 1e-4
        assert abs(r.perplexity - math.exp(loss)) <= 1e-3 * math.exp(loss)


def test_sampling_is_independent_of_batching(models):
    _, ours = models
    ps = prompts(9, seed=4)
    params = SamplingParams(max_new_tokens=10, temperature=0.8, top_k=50, top_p=0.9, seed=7)
    ids = [100 + i for i in range(9)]
    alone = [Engine(ours, max_batch_size=1).generate([p], [i], params)[0].tokens for p, i in zip(ps, ids)]
    batched = Engine(ours, max_batch_size=8).generate(ps, ids, params)
    shuffled_order = [8, 3, 0, 5, 1, 7, 2, 6, 4]
    shuffled = Engine(ours, max_batch_size=8).generate([ps[i] for i in shuffled_order],
                                                       [ids[i] for i in shuffled_order], params)
    assert [r.tokens for r in batched] == alone
    assert [r.tokens for r in shuffled] == [alone[i] for i in shuffled_order]
    other_seed = Engine(ours, max_batch_size=8).generate(ps, ids, SamplingParams(**{**params.__dict__, "seed": 8}))
    assert [r.tokens for r in other_seed] != alone


def test_stop_tokens_end_rows_and_compaction_keeps_others_exact(models):
    _, ours = models
    ps = prompts(6, seed=5)
    free = Engine(ours, max_batch_size=8).generate(ps, list(range(6)), SamplingParams(max_new_tokens=15))
    stop_id = free[0].tokens[2]  # row 0 stops at or before its third token; others may stop on it too
    res = Engine(ours, max_batch_size=8).generate(ps, list(range(6)), SamplingParams(max_new_tokens=15,
                                                                                      stop_token_ids=[stop_id]),
                                                  return_logprobs=True)
    for f, r in zip(free, res):
        if stop_id in f.tokens:
            cut = f.tokens.index(stop_id) + 1
            assert r.tokens == f.tokens[:cut] and r.finish_reason == "stop"
        else:
            assert r.tokens == f.tokens and r.finish_reason == "length"
        assert len(r.logprobs) == len(r.tokens) and all(lp <= 0 for lp in r.logprobs)


def test_context_overflow_policies(models):
    _, ours = models
    long = list(range(1, 61))  # 60 tokens + 10 new > context 64
    with pytest.raises(PromptError, match="record 42: prompt of 60 tokens \\+ 10 new tokens exceeds"):
        Engine(ours).generate([long], [42], SamplingParams(max_new_tokens=10))
    r = Engine(ours, overflow="truncate_left").generate([long], [42], SamplingParams(max_new_tokens=10))[0]
    ref = Engine(ours).generate([long[-54:]], [42], SamplingParams(max_new_tokens=10))[0]
    assert r.truncated == 6 and r.tokens == ref.tokens
    with pytest.raises(PromptError, match="record 3: empty prompt"):
        Engine(ours).generate([[1, 2], []], [2, 3], SamplingParams(max_new_tokens=4))


@pytest.mark.gpu
def test_cuda_graph_bf16_decode_matches_eager(models):
    _, ours = models
    ps = prompts(6, seed=6)
    params = SamplingParams(max_new_tokens=12)
    eager = Engine(ours, device="cuda", dtype=torch.bfloat16, max_batch_size=8).generate(ps, list(range(6)), params)
    graph = Engine(ours, device="cuda", dtype=torch.bfloat16, max_batch_size=8,
                   use_cuda_graphs=True).generate(ps, list(range(6)), params)
    assert [r.tokens for r in graph] == [r.tokens for r in eager]


def test_sampling_with_shared_prefixes_matches_each_row_alone(models):
    """Per-record streams hold when rows share a system prompt's cache blocks and are refilled."""
    _, ours = models
    system = prompts(1, seed=9, lo=35, hi=36)[0]
    ps = [system + p for p in prompts(9, seed=10, hi=12)]
    params = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=50, top_p=0.9, seed=3)
    ids = [200 + i for i in range(9)]
    alone = [Engine(ours, max_batch_size=1, share_prefixes=False).generate([p], [i], params)[0].tokens
             for p, i in zip(ps, ids)]
    engine = Engine(ours, max_batch_size=4)
    shared = engine.generate(ps, ids, params)
    assert engine.stats.reused_tokens == 8 * 32
    assert [r.tokens for r in shared] == alone


def test_stop_when_ends_a_row_at_once_and_its_place_goes_to_the_next_prompt(models):
    """A stop string (the job's `stop_when`) ends its row where it completes, not at max_new_tokens."""
    _, ours = models
    ps = prompts(6, seed=5)
    params = SamplingParams(max_new_tokens=15)
    free = Engine(ours, max_batch_size=2).generate(ps, list(range(6)), params)

    def stop_when(tokens):  # decided by the row's own tokens, as a stop string is
        return len(tokens) >= 3 and tokens[-1] % 3 == 0

    engine = Engine(ours, max_batch_size=2)
    res = engine.generate(ps, list(range(6)), params, stop_when=stop_when)
    stopped = 0
    for f, r in zip(free, res):
        cut = next((n for n in range(3, 16) if f.tokens[n - 1] % 3 == 0), None)
        if cut is None:
            assert r.tokens == f.tokens and r.finish_reason == "length"
        else:
            assert r.tokens == f.tokens[:cut] and r.finish_reason == "stop_string"
            stopped += 1
    assert stopped >= 2, "too few rows stopped to show anything"
    assert engine.stats.decode_steps < -(-sum(len(r.tokens) for r in free) // 2)


def test_stop_string_check_confirms_on_the_whole_text():
    from hpcllm.infer.job import stop_string_check

    text = {1: b"a", 2: b"b", 3: b"\n", 4: b"Hello"}
    decode = lambda toks: b"".join(text[t] for t in toks)  # noqa: E731
    check = stop_string_check([b"\nHel", b"bb"], decode)
    assert not check([4, 1, 2]) and check([1, 2, 2]) and check([1, 3, 4]) and not check([3, 1, 4])
    assert check([2, 1, 1, 1, 1, 1, 3, 4]) and stop_string_check([], decode) is None
    # a slice that decodes to more than its part of the whole text (a tokenizer's leading-space rule)
    # must not end the row: the whole text is asked before stopping
    odd = lambda toks: (b"\n" if toks[0] == 4 else b"") + decode(toks)  # noqa: E731
    tokens = [1, 1, 1, 4, 1, 1, 1, 1]  # its last 5 tokens decode to b"\nHelloaaaa" here
    assert b"\nHel" in odd(tokens[-5:]) and not stop_string_check([b"\nHel"], odd)(tokens)
