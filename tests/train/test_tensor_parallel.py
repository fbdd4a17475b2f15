"""Tensor parallelism (parallel.tp) on real ranks with gloo, through the CLI: tp=2, dp=2 x tp=2, and
ZeRO-1 or FSDP2 over dp x tp each give the losses and weights of one rank with the union batch, for both
families (GPT-2's fused q/k/v, Llama's GQA); a tp=2 checkpoint resumes at tp=1 and a tp=1 one at
tp=2, continuing the uninterrupted run; a rank's parameters at tp=2 are about half of tp=1's; plans
that cannot run are one-line config errors naming the field."""

import json
import re
import subprocess
import sys

import pytest

from hpcllm.config import load_spec
from hpcllm.parallel.cli import model_for_plan
from hpcllm.parallel.estimate import estimate_memory
from tests.mpi_util import run_mpi
from tests.train.test_sharded import GLOBAL, GPT, LLAMA, MID, assert_same_run, metrics, resume_copy, spec_file, train

pytestmark = pytest.mark.mpi


def tp_run(shared_run, n: int, tp: int, shard: str, family: str):
    """The plan's run with the union batch, once per module (the resume test below continues the tp=2
    GPT one): (run_dir, spec_path, CompletedProcess)."""
    return shared_run(f"tp{tp}-{shard}-{n}-{family}", LLAMA if family == "llama" else GPT, n, backend="torch",
                      shard=shard, tp=tp, batch=GLOBAL // (n // tp))


# each family's tp split on 2 ranks; dp=2 x tp=2 with ZeRO-1 and with FSDP2 (the data-parallel side does
# not depend on the family, and plain dp=2 x tp=2 is the ZeRO-1 case without its sharded step)
@pytest.mark.parametrize("n,tp,shard,family", [(2, 2, "none", "llama"), (2, 2, "none", "gpt"),
                                               (4, 2, "full", "gpt"), (4, 2, "optimizer", "gpt")])
def test_tensor_parallel_equals_one_rank_with_the_union_batch(shared_run, references, n, tp, shard, family):
    run, spec, p = tp_run(shared_run, n, tp, shard, family)
    assert f"{n // tp} data-parallel rank(s)" in p.stderr and f"parallel.shard={shard} tp={tp}" in p.stderr
    assert_same_run(run, references / family)
    got, one = metrics(run)[-1], metrics(references / family)[-1]
    if shard == "none":  # every layer split in two (norms are a few hundred bytes)
        for key in ("params_bytes", "grads_bytes", "optimizer_bytes"):
            assert got[key] <= 0.55 * one[key], (key, got[key], one[key])
    # `hpcllm plan`'s estimate is what the ranks measured (rank 0's: the largest part of each tensor)
    spec = load_spec(spec)
    est = estimate_memory(model_for_plan(spec), shard, tp, n // tp)
    assert_estimate(got, est, shard)
    if shard == "optimizer":  # AdamW's moments of half of each tp part
        assert got["optimizer_bytes"] <= 0.3 * one["optimizer_bytes"], (got["optimizer_bytes"], one["optimizer_bytes"])


def assert_estimate(got: dict, est: dict, shard: str) -> None:
    """The measured bytes are the estimate's; ZeRO-1's gradients add its buffers (its two staging
    slots and this rank's rows) to the whole gradients the estimate counts."""
    exact = [k for k in est if not (shard == "optimizer" and k == "grads_bytes")]
    assert {k: got[k] for k in exact} == {k: est[k] for k in exact}
    assert got["grads_bytes"] >= est["grads_bytes"]


def test_gathered_logits_train_the_same(tmp_path, dataset, references):
    """parallel.vocab_parallel=false: logits gathered on every tp rank, the plain loss."""
    spec = spec_file(tmp_path, dataset, "gathered", LLAMA, backend="torch", tp=2)
    train(spec, 2, "parallel.vocab_parallel=false")
    assert_same_run(tmp_path / "gathered", references / "llama")


def test_checkpoints_resume_across_tensor_parallel_plans(tmp_path, dataset, references, shared_run):
    """tp=2 (its step 5) on one rank, and one rank's step 5 at dp=2 x tp=2 with FSDP on 4 ranks: both
    continue the uninterrupted run. (The tp=2 run is the one the test above checked, not another.)"""
    tp2, _, _ = tp_run(shared_run, 2, 2, "none", "gpt")
    resume_copy(tp2, tmp_path / "to1")
    p = train(spec_file(tmp_path, dataset, "to1", GPT, backend="single"), 1)
    assert f"resumed step {MID} from 2 rank(s) on 1 rank(s) (parallel.shard none -> none) (parallel.tp 2 -> 1)" \
        in p.stderr
    assert_same_run(tmp_path / "to1", references / "gpt")

    resume_copy(references / "gpt", tmp_path / "from1")
    p = train(spec_file(tmp_path, dataset, "from1", GPT, backend="torch", tp=2, shard="full", batch=3), 4)
    assert f"resumed step {MID} from 1 rank(s) on 4 rank(s) (parallel.shard none -> full) (parallel.tp 1 -> 2)" \
        in p.stderr
    assert_same_run(tmp_path / "from1", references / "gpt")


def test_zero1_checkpoints_resume_across_plans(tmp_path, dataset, references):
    """ZeRO-1 over dp x tp keeps the AdamW moments of 1/dp of each tp part, saved as DTensors of the
    whole parameters (dp's rows strided within tp's where both cut dim 0): dp=2 x tp=2's step 5
    continues on one rank, and one rank's step 5 continues at dp=2 x tp=2 (GPT-2: the tied embedding
    split by vocabulary rows, then by dp)."""
    train(spec_file(tmp_path, dataset, "zero", LLAMA, backend="torch", tp=2, shard="optimizer", batch=3), 4)
    resume_copy(tmp_path / "zero", tmp_path / "to1")
    p = train(spec_file(tmp_path, dataset, "to1", LLAMA, backend="single"), 1)
    assert f"resumed step {MID} from 4 rank(s) on 1 rank(s) (parallel.shard optimizer -> none) (parallel.tp 2 -> 1)" \
        in p.stderr
    assert_same_run(tmp_path / "to1", references / "llama")

    resume_copy(references / "gpt", tmp_path / "from1")
    p = train(spec_file(tmp_path, dataset, "from1", GPT, backend="torch", tp=2, shard="optimizer", batch=3), 4)
    assert f"resumed step {MID} from 1 rank(s) on 4 rank(s) (parallel.shard none -> optimizer) (parallel.tp 1 -> 2)" \
        in p.stderr
    assert_same_run(tmp_path / "from1", references / "gpt")


def _fails(spec, n, *overrides):
    cmd = [sys.executable, "-m", "hpcllm.cli", "train", str(spec), *overrides]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120) if n == 1 else run_mpi(n, cmd, timeout=120)
    assert p.returncode != 0
    lines = [x for x in p.stderr.splitlines() if "error" in x.lower()]
    assert lines and "Traceback" not in p.stderr, p.stderr[-2000:]
    return p.stderr


def test_plans_that_cannot_run_are_config_errors(tmp_path, dataset):
    spec = spec_file(tmp_path, dataset, "bad", LLAMA, backend="torch", tp=2)
    assert "parallel.tp=2 does not divide the world of 3 rank(s)" in _fails(spec, 3)
    assert "parallel.tp=3 does not divide model.n_head=4" in _fails(spec, 1, "parallel.tp=3")
    assert "parallel.tp=2 needs dist.backend torch" in _fails(spec, 1, "dist.backend=mpi")
    assert "tp must be >= 1" in _fails(spec, 1, "parallel.tp=0")


def test_plan_dry_run_for_a_world_we_do_not_have(tmp_path):
    """`hpcllm plan` on a login node: Llama 3 8B on 64 GPUs, no data, nothing started."""
    spec = tmp_path / "8b.yaml"
    spec.write_text(json.dumps({"kind": "train", "name": "8b", "model": {"arch": "llama", "size": "llama3-8b"},
                                "parallel": {"shard": "full", "tp": 8},
                                "train": {"global_batch_size": 512, "batch_size": 1, "seq_len": 8192},
                                "slurm": {"nodes": 8, "tasks_per_node": 8}}))
    plan = subprocess.run([sys.executable, "-m", "hpcllm.cli", "plan", str(spec)], capture_output=True, text=True,
                          timeout=120)
    assert plan.returncode == 0, plan.stderr
    out = plan.stdout
    assert "on 64 rank(s): parallel.shard=full, tp=8 -> mesh dp=8 x tp=8" in out
    assert "8030.3M parameters" in out and "query heads [t*4, (t+1)*4)" in out
    assert "512 sequences/step = 8 data-parallel rank(s) x batch 1 x 64 micro-step(s)" in out
    # 8.03e9 fp32 parameters / 64 ranks, + the same in gradients, + two AdamW moments
    per_rank = re.search(r"parameters ([\d.]+) GiB, gradients ([\d.]+) GiB, optimizer state ([\d.]+) GiB", out)
    p, g, o = (float(x) for x in per_rank.groups())
    assert abs(p - 8.03e9 * 4 / 64 / 2**30) < 0.02 and g == p and abs(o - 2 * p) < 0.02, out
    across = subprocess.run([sys.executable, "-m", "hpcllm.cli", "plan", str(spec), "--world", "64",
                             "slurm.tasks_per_node=4", "slurm.nodes=16"], capture_output=True, text=True, timeout=120)
    assert "WARNING: tp=8 > slurm.tasks_per_node=4: a tp group spans nodes" in across.stdout
    bad = subprocess.run([sys.executable, "-m", "hpcllm.cli", "plan", str(spec), "--world", "12"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "parallel.tp=8 does not divide the world of 12 rank(s)" in bad.stderr
    assert "Traceback" not in bad.stderr
