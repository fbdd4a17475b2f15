"""Tensor-parallel inference: the engine on a model split over 2 gloo ranks (heads and KV cache
split, logits gathered) gives every rank the token-identical greedy output of the whole model and the
same sampled output (per-record seeds), for both families; scoring agrees to fp32 rounding."""

import pytest

from tests.mpi_util import run_on_ranks

pytestmark = pytest.mark.mpi


def _body(archs: list[str]) -> dict:
    """Both families in one 2-rank job (one launch instead of two: ~10 s of start-up saved)."""
    from hpcllm.comm import DistConfig, init_comm

    comm = init_comm(DistConfig(backend="torch", device="cpu", timeout_s=60))
    out = {arch: _one_family(comm, arch) for arch in archs}
    # the group closed together: a rank that leaves with gloo's threads still up can abort at exit
    comm.close()
    return out


def _one_family(comm, arch: str) -> dict:
    import torch

    from hpcllm.infer.engine import Engine
    from hpcllm.infer.sampling import SamplingParams
    from hpcllm.model import build_model
    from hpcllm.model.config import ModelConfig
    from hpcllm.parallel.parallelize import for_inference

    extra = {"n_kv_head": 2, "ffn_dim": 96} if arch == "llama" else {}
    cfg = ModelConfig(arch=arch, size="custom", n_layer=2, n_head=4, n_embd=32, block_size=128, **extra).resolve(101)

    def model():
        return build_model(cfg).init_weights(seed=5)

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 101, (int(n),), generator=g).tolist() for n in (3, 17, 9, 30, 1)]
    ids = list(range(100, 105))
    greedy = SamplingParams(max_new_tokens=12)
    sampled = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.95, seed=7, stop_token_ids=[3])

    def run(m):
        e = Engine(m, max_batch_size=3)
        return ([r.tokens for r in e.generate(prompts, ids, greedy)],
                [(r.tokens, r.finish_reason) for r in e.generate(prompts, ids, sampled)],
                [r.logprob_sum for r in e.score(prompts, [p[:4] for p in prompts], ids)])

    whole = run(model())
    split, _ = for_inference(model(), comm, 2)
    cache = split.new_paged_kv_cache(3, 16, "cpu")
    got = run(split)
    return {"greedy": got[0] == whole[0], "sampled": got[1] == whole[1],
            "score_err": max(abs(a - b) for a, b in zip(got[2], whole[2])),
            "kv_heads": cache.k.shape[3], "tokens": got[0]}


ARCHS = ["llama", "gpt2"]


@pytest.fixture(scope="module")
def tp2_ranks():
    return run_on_ranks(2, "tests.infer.test_tensor_parallel:_body", archs=ARCHS, timeout=240)


@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_generates_what_one_rank_does(tp2_ranks, arch):
    ranks = [r[arch] for r in tp2_ranks]
    for r in ranks:
        assert r["greedy"] and r["sampled"], r
        assert r["score_err"] < 1e-4, r
        assert r["kv_heads"] == (1 if arch == "llama" else 2)
    assert ranks[0]["tokens"] == ranks[1]["tokens"]
