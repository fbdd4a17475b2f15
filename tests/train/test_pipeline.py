"""Pipeline parallelism (parallel.pp) on real ranks with gloo, through the CLI: pp=2 for both families
(GPT-2's tied embedding on the first and the last stage) under GPipe and 1F1B, dp=2 x pp=2, FSDP2
within each stage, and pp=2 x tp=2, each give the losses and weights of one rank with the union batch, and an
evaluation the val_loss of one rank; a pp=2 checkpoint resumes at pp=1 and a pp=1 one at pp=2,
continuing the uninterrupted run, and exports the whole model; a rank's parameters at pp=2 are about
half of pp=1's and equal to `hpcllm plan`'s estimate; plans that cannot run are one-line config
errors naming the field."""

import json
import re
import subprocess
import sys

import pytest

from hpcllm.config import load_spec
from hpcllm.errors import ConfigError
from hpcllm.parallel.cli import model_for_plan
from hpcllm.parallel.estimate import estimate_memory
from tests.train.test_sharded import GPT, LLAMA, assert_same_run, metrics, resume_copy, spec_file, train
from tests.train.test_tensor_parallel import _fails

pytestmark = pytest.mark.mpi


def one_rank_val_loss(run_dir, step: int, spec_path) -> float:
    """The val_loss the trainer's `evaluate` gives on one rank for the checkpoint of `step`."""
    from hpcllm.checkpoint import load_trained_model
    from hpcllm.comm import init_comm
    from hpcllm.data import open_dataset
    from hpcllm.parallel.plans import Plan
    from hpcllm.train.trainer import evaluate

    spec = load_spec(spec_path, ["parallel.pp=1", "dist.backend=single"])
    model, _, _ = load_trained_model(run_dir / "checkpoints" / f"step_{step:08d}")
    comm = init_comm(spec.dist)
    return evaluate(model, open_dataset(spec.data.dataset), spec, comm, Plan(model, None, comm, 0.0))


# (ranks, parallel.shard, tp, family, schedule): 2 ranks are one pipeline of 2 stages (3 sequences x 2
# micro-batches); 4 ranks are dp=2 x pp=2 (1 sequence x 3 micro-batches per pipeline), or pp=2 x tp=2
@pytest.mark.parametrize("n,shard,tp,family,schedule", [
    (2, "none", 1, "gpt", "gpipe"), (2, "none", 1, "gpt", "1f1b"), (2, "none", 1, "llama", "gpipe"),
    (2, "none", 1, "llama", "1f1b"), (4, "none", 1, "gpt", "1f1b"), (4, "full", 1, "llama", "1f1b"),
    (4, "none", 2, "gpt", "1f1b")])
def test_pipeline_equals_one_rank_with_the_union_batch(tmp_path, dataset, references, n, shard, tp, family, schedule):
    name = f"pp2-{schedule}-{shard}-tp{tp}-{n}-{family}"
    model = LLAMA if family == "llama" else GPT
    dp = n // (2 * tp)
    spec = spec_file(tmp_path, dataset, name, model, backend="torch", shard=shard, tp=tp, batch=3 if dp == 1 else 1)
    evaluated = (n, family, schedule) == (2, "gpt", "gpipe")
    p = train(spec, n, "parallel.pp=2", f"parallel.pp_schedule={schedule}",
              *(["train.eval_interval=10"] if evaluated else []))
    assert f"{dp} data-parallel rank(s)" in p.stderr and f"parallel.shard={shard} tp={tp} pp=2 ({schedule})" in p.stderr
    assert_same_run(tmp_path / name, references / family)
    if evaluated:  # through the pipeline's evaluation schedule: what one rank's evaluate gives
        got = {m["step"]: m["val_loss"] for m in metrics(tmp_path / name) if "val_loss" in m}
        assert list(got) == [10, 20]
        for step, value in got.items():
            assert abs(value - one_rank_val_loss(tmp_path / name, step, spec)) <= 1e-5 * value, (step, value)
    got, one = metrics(tmp_path / name)[-1], metrics(references / family)[-1]
    if family == "llama" and shard == "none":  # untied: stage 0 holds the embedding and one of the two layers
        for key in ("params_bytes", "grads_bytes", "optimizer_bytes"):
            assert got[key] <= 0.55 * one[key], (key, got[key], one[key])
    # `hpcllm plan`'s estimate is what rank 0 (stage 0) measured
    est = estimate_memory(model_for_plan(load_spec(spec, ["parallel.pp=2"])), shard, tp, dp, 2)
    assert {k: got[k] for k in est} == est


def test_checkpoints_resume_across_pipeline_plans(tmp_path, dataset, references):
    """pp=2's step 10 on one rank; one rank's step 10 at dp=2 x pp=2 with FSDP2 in each stage: both
    continue the uninterrupted run. A pp=2 checkpoint exports the whole model."""
    from safetensors.torch import load_file

    from hpcllm.checkpoint.export import export
    from tests.train.test_sharded import weights

    train(spec_file(tmp_path, dataset, "pp2", GPT, backend="torch", batch=3), 2, "parallel.pp=2")
    resume_copy(tmp_path / "pp2", tmp_path / "to1")
    p = train(spec_file(tmp_path, dataset, "to1", GPT, backend="single"), 1)
    assert "resumed step 10 from 2 rank(s) on 1 rank(s) (parallel.shard none -> none) (parallel.pp 2 -> 1)" in p.stderr
    assert_same_run(tmp_path / "to1", references / "gpt")

    out = export(str(tmp_path / "pp2"), str(tmp_path / "hf"))
    exported, want = load_file(str(out / "model.safetensors")), weights(references / "gpt")
    assert sorted(exported) == sorted(want)  # every stage's tensors, the tied one once

    resume_copy(references / "llama", tmp_path / "from1")
    p = train(spec_file(tmp_path, dataset, "from1", LLAMA, backend="torch", shard="full", batch=1), 4, "parallel.pp=2")
    assert "resumed step 10 from 1 rank(s) on 4 rank(s) (parallel.shard none -> full) (parallel.pp 1 -> 2)" in p.stderr
    assert_same_run(tmp_path / "from1", references / "llama")


def _refused(spec, *overrides) -> str:
    with pytest.raises(ConfigError) as e:
        load_spec(spec, list(overrides))
    assert "\n" not in str(e.value)
    return str(e.value)


def _plan(spec, world: int, *overrides) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcllm.cli", "plan", str(spec), "--world", str(world), *overrides],
                          capture_output=True, text=True, timeout=120)


def test_plans_that_cannot_run_are_config_errors(tmp_path, dataset):
    spec = spec_file(tmp_path, dataset, "bad", LLAMA, backend="torch", batch=3)
    assert "parallel.pp=2 does not divide the world of 1 rank(s)" in _fails(spec, 1, "parallel.pp=2")
    assert "parallel.pp=3 is more than model.n_layer=2" in _refused(spec, "parallel.pp=3")
    assert "parallel.pp=2 needs dist.backend torch" in _refused(spec, "parallel.pp=2", "dist.backend=mpi")
    assert "parallel.shard=optimizer with parallel.pp > 1 is not implemented" in \
        _refused(spec, "parallel.pp=2", "parallel.shard=optimizer")
    assert "parallel.pp=2: inference is not pipelined" in _refused(spec, "kind=infer", "parallel.pp=2")
    assert "pp must be >= 1" in _refused(spec, "parallel.pp=0")
    assert "'parallel.pp_schedule' must be one of" in _refused(spec, "parallel.pp_schedule=zigzag")
    assert "train.compile with parallel.pp > 1 is not implemented" in _refused(spec, "parallel.pp=2", "train.compile=true")
    # 1F1B needs pp micro-batches per step: known at load with grad_accum, with the world otherwise
    assert "needs at least 2 micro-batches per step, this run has 1 (train.grad_accum=1)" in \
        _refused(spec, "parallel.pp=2", "train.global_batch_size=0")
    few = _plan(spec, 2, "parallel.pp=2", "train.batch_size=6")
    assert few.returncode != 0 and "Traceback" not in few.stderr
    assert ("parallel.pp=2 with pp_schedule 1f1b needs at least 2 micro-batches per step, this run has 1 "
            "(train.global_batch_size=6 / (1 data-parallel rank(s) x train.batch_size=6)): raise "
            "train.global_batch_size") in few.stderr
    assert _plan(spec, 2, "parallel.pp=2", "train.batch_size=6", "parallel.pp_schedule=gpipe").returncode == 0


def test_plan_dry_run_shows_the_stages(tmp_path):
    """`hpcllm plan` for a 405B-shaped Llama on 512 ranks: 8 stages of FSDP2 over 64 ranks each."""
    spec = tmp_path / "405b.yaml"
    spec.write_text(json.dumps({
        "kind": "train", "name": "405b", "parallel": {"shard": "full", "pp": 8},
        "model": {"arch": "llama", "size": "custom", "n_layer": 126, "n_head": 128, "n_kv_head": 8, "n_embd": 16384,
                  "ffn_dim": 53248, "block_size": 8192, "vocab_size": 128256},
        "train": {"global_batch_size": 2048, "batch_size": 1, "seq_len": 8192, "activation_checkpointing": True},
        "slurm": {"nodes": 64, "tasks_per_node": 8}}))
    plan = _plan(spec, 512)
    assert plan.returncode == 0, plan.stderr
    out = plan.stdout
    assert "on 512 rank(s): parallel.shard=full, tp=1, pp=8 -> mesh pp=8 x dp=64 x tp=1" in out
    assert "stage 0 (ranks 0..63): embedding, layers 0..15;" in out  # 126 = 6 x 16 + 2 x 15
    assert "stage 6 (ranks 384..447): layers 96..110;" in out
    assert "stage 7 (ranks 448..511): layers 111..125, head and loss;" in out
    assert "schedule 1f1b: 32 micro-batch(es) per step, bubble (pp-1)/(micro-batches+pp-1) = 18%" in out
    # stage 0's share: its 16 layers and the embedding over 64 ranks, 16 bytes per parameter
    per_rank = re.search(r"parameters ([\d.]+) GiB, gradients ([\d.]+) GiB, optimizer state ([\d.]+) GiB", out)
    p, g, o = (float(x) for x in per_rank.groups())
    layer = 2 * 16384 * 16384 + 2 * 16384 * 1024 + 3 * 16384 * 53248 + 2 * 16384
    stage0 = 16 * layer + 128256 * 16384
    assert abs(p - stage0 * 4 / 64 / 2**30) < 0.01 and g == p and abs(o - 2 * p) < 0.01, out
