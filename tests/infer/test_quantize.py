"""Weight-only quantization (infer.quantize, hpcllm.infer.quantize): logits close to full precision,
a streamed load equal to quantizing the loaded model (HF directory and hpcllm checkpoint), `hpcllm
infer` end to end, its outputs' fingerprint, and one-line refusals where it cannot run.

Tiny random models (n_embd 64): cheap, and enough for what is checked here — closeness of logits and
equality of weights. Output quality is measured on a trained model in docs/inference.md."""

import copy
import json
import warnings

import pytest
import torch

from hpcllm.errors import ConfigError
from hpcllm.infer.quantize import (QuantLinear, check_supported, dequantized, load_quantized, quantize_model,
                                   _kernel_problem)
from hpcllm.model import ModelConfig, build_model
from tests.infer.helpers import infer_spec, model_and_prompts, outputs

RECORDS = [{"id": i, "prompt": "ab " * (1 + i % 4) + str(i)} for i in range(6)]


def small(arch: str, seed: int = 0):
    cfg = ModelConfig(arch=arch, size="custom", n_layer=2, n_head=2, n_embd=64, block_size=64,
                      vocab_size=258).resolve()
    return build_model(cfg).init_weights(seed).eval()


def logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_int8_logits_are_close_to_full_precision(arch):
    model = small(arch)
    idx = torch.randint(0, 258, (3, 20), generator=torch.Generator().manual_seed(0))
    ref = logits(model, idx)
    q8 = quantize_model(copy.deepcopy(model), "int8").to("cpu", torch.float32)  # what Engine does to it
    q4 = quantize_model(copy.deepcopy(model), "int4").to("cpu", torch.float32)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    # every linear layer but the output head, which stays in full precision
    assert sum(isinstance(m, QuantLinear) for m in q8.modules()) == n_linear - 1
    assert type(q8.lm_head) is torch.nn.Linear and torch.equal(q8.lm_head.weight, model.lm_head.weight)
    err8, err4 = [(logits(q, idx) - ref).abs().max().item() for q in (q8, q4)]
    scale = ref.abs().max().item()
    # int8 rounds each weight by at most max|w of its row|/254 (0.4%) and the kernel's activations
    # are bf16 (0.4%): a few errors of that size add up, measured ~0.7% here; int4 (16 levels a
    # group) is ~10x coarser: the bounds are 2% and 20% of the largest logit, with int8 well ahead
    assert err8 < 0.02 * scale and err4 < 0.2 * scale and err8 < err4 / 3, (err8, err4, scale)
    # and the kernel computes what the quantized weights stand for: the same model with each weight
    # replaced by its dequantized value, up to the bf16 activations only (tighter than above)
    deq = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in deq.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                m.weight.copy_(dequantized(m.weight, "int8"))
    assert (logits(q8, idx) - logits(deq, idx)).abs().max().item() < 0.01 * scale


def test_a_quantized_model_survives_the_engines_move_and_cast():
    """Engine does model.to(device, dtype): the int8 codes stay int8, the scales keep their dtype."""
    from hpcllm.infer.engine import Engine
    from hpcllm.infer.sampling import SamplingParams

    q = quantize_model(small("llama"), "int8")
    lin = q.model.layers[0].mlp.up_proj
    assert isinstance(lin, QuantLinear) and lin.qweight.dtype == torch.int8 and lin.scales.dtype == torch.float32
    q.to(torch.bfloat16)
    assert lin.qweight.dtype == torch.int8 and lin.scales.dtype == torch.float32
    engine = Engine(q, device=torch.device("cpu"), dtype=torch.float32, max_batch_size=2)
    out = engine.generate([[1, 2, 3], [4, 5]], [0, 1], SamplingParams(max_new_tokens=5))
    assert [len(r.tokens) for r in out] == [5, 5]


def test_a_streamed_load_equals_quantizing_the_loaded_model(tmp_path):
    """From an HF directory and from an hpcllm (DCP) checkpoint: the weights stream in one at a time
    and are quantized as they come; the result is the loaded model, quantized."""
    from functools import partial

    import torch.distributed.checkpoint as dcp

    from hpcllm.checkpoint import load_trained_model, stream_checkpoint, trained_model_on_meta
    from hpcllm.config import to_dict
    from hpcllm.model import load_hf_model, save_hf_model
    from hpcllm.model.hf import hf_model_on_meta, stream_hf_weights

    model = small("llama", seed=5)
    save_hf_model(model, tmp_path / "hf")
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process": it is
        dcp.save({"model": model.state_dict()}, storage_writer=dcp.FileSystemWriter(str(ckpt / "dcp")), no_dist=True)
    torch.save({}, ckpt / "state.pt")
    (ckpt / "meta.json").write_text(json.dumps({"model": to_dict(model.config),
                                                "spec": {"model": {}, "data": {"dataset": "x"}}}))
    for scheme in ("int8", "int4"):
        want = quantize_model(load_hf_model(tmp_path / "hf")[0], scheme).state_dict()
        meta_model, _ = hf_model_on_meta(tmp_path / "hf")
        from_hf = load_quantized(meta_model, scheme, "cpu", partial(stream_hf_weights, tmp_path / "hf"))
        meta_model, _, _, found = trained_model_on_meta(tmp_path / "run")
        from_ckpt = load_quantized(meta_model, scheme, "cpu", partial(stream_checkpoint, found))
        assert quantize_model(load_trained_model(tmp_path / "run")[0], scheme).state_dict().keys() == want.keys()
        for got in (from_hf.state_dict(), from_ckpt.state_dict()):
            assert got.keys() == want.keys()
            for k in want:
                assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (scheme, k)


# ------------------------------------------------------------------------------------ the job


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cli):
    return model_and_prompts(tmp_path_factory.mktemp("quantize"), RECORDS, cli)


def spec(root, name, **infer):
    return infer_spec(root, name, model=root / "model", prompts=root / "prompts", temperature=0.0, **infer)


def test_infer_with_int8_weights_and_a_rerun_with_another_scheme_is_refused(setup, cli):
    s = spec(setup, "q8", quantize="int8")
    r = cli("infer", s)
    assert r.returncode == 0, r.stderr[-2000:]
    got = outputs(setup / "q8")
    assert sorted(got) == [r["id"] for r in RECORDS] and all(len(t) == 12 for t in got.values())
    man = json.loads((setup / "q8" / "outputs" / "manifest.json").read_text())
    assert man["fingerprint"]["quantize"] == "int8"
    # the same settings resume (the quantized weights hash the same); another scheme is refused
    r = cli("infer", s)
    assert r.returncode == 0 and "resuming: 2 of 2 shards already done" in r.stderr, r.stderr[-2000:]
    for other, said in (("none", '"int8" there, "none" now'), ("int4", '"int8" there, "int4" now')):
        r = cli("infer", s, f"infer.quantize={other}")
        assert r.returncode == 8 and f"infer.quantize: {said}" in r.stderr and "--force" in r.stderr, r.stderr[-1500:]
    # a full-precision run's outputs refuse an int8 rerun in the same words
    assert cli("infer", spec(setup, "full")).returncode == 0
    r = cli("infer", spec(setup, "full"), "infer.quantize=int8")
    assert r.returncode == 8 and 'infer.quantize: "none" there, "int8" now' in r.stderr


def test_refused_in_one_line_where_it_cannot_run(setup, cli):
    r = cli("infer", spec(setup, "tp"), "infer.quantize=int8", "parallel.tp=2")
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
    assert r.returncode == 2 and len(errors) == 1 and "infer.quantize=int8" in errors[0] \
        and "parallel.tp=2" in errors[0], r.stderr[-2000:]
    r = cli("infer", spec(setup, "bad"), "infer.quantize=int3")
    assert r.returncode == 2 and "quantize" in r.stderr


def test_a_platform_without_the_kernel_is_refused(monkeypatch):
    def missing(*a, **k):
        raise RuntimeError("Could not run 'aten::_weight_int4pack_mm_for_cpu' with arguments from the 'CPU' backend")

    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", missing)
    _kernel_problem.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"^infer.quantize=int4 cannot run on cpu: .*no int4 kernel"):
            check_supported("int4", "cpu")
        check_supported("int8", "cpu")  # int8 has its kernel
    finally:
        _kernel_problem.cache_clear()


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_on_cuda_both_kernels_run_and_the_decode_step_is_captured(scheme):
    """scripts/gpu_check.sh: on an sm80+ GPU both schemes have their kernel; the engine moves and casts
    the quantized model to bf16, captures its decode step as a CUDA graph, and matches eager decoding."""
    from hpcllm.infer.engine import Engine
    from hpcllm.infer.sampling import SamplingParams

    check_supported(scheme, "cuda")
    model = small("llama")
    idx = torch.randint(0, 258, (3, 20), generator=torch.Generator().manual_seed(0))
    ref = logits(model, idx)
    q = quantize_model(copy.deepcopy(model), scheme, "cuda").to("cuda", torch.bfloat16)
    err = (logits(q, idx.cuda()).float().cpu() - ref).abs().max().item()
    assert err < (0.05 if scheme == "int8" else 0.2) * ref.abs().max().item(), err  # bf16 activations too
    ps, params = [[1, 2, 3, 4], [5, 6], [7, 8, 9]], SamplingParams(max_new_tokens=8)
    eager = Engine(q, device="cuda", dtype=torch.bfloat16, max_batch_size=4).generate(ps, [0, 1, 2], params)
    engine = Engine(q, device="cuda", dtype=torch.bfloat16, max_batch_size=4, use_cuda_graphs=True)
    graph = engine.generate(ps, [0, 1, 2], params)
    assert engine.cuda_graph_fallback is None and [r.tokens for r in graph] == [r.tokens for r in eager]
