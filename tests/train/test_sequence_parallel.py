"""Sequence parallelism (parallel.sequence_parallel) on real ranks with gloo, through the CLI: the norms,
dropout and residual adds on sequence slices give the losses and weights of one rank with the union
batch, for GPT-2 (LayerNorm with bias, learned positions added on the slices) and Llama (RMSNorm,
rotary applied after the all-gather), at tp=2, at dp=2 x tp=2 (data parallel, ZeRO-1 and FSDP2) and within pp=2 stages; its
checkpoint resumes on one rank; plans that cannot run are one-line config errors naming the field;
`hpcllm plan` says what it splits."""

import json
import subprocess
import sys

import pytest

from tests.train.test_sharded import GLOBAL, GPT, LLAMA, MID, assert_same_run, resume_copy, spec_file, train
from tests.train.test_tensor_parallel import _fails

pytestmark = pytest.mark.mpi


def sp_run(shared_run, n: int, shard: str, family: str):
    """The plan's tp=2 sequence-parallel run with the union batch, once per module (the resume test
    below continues the 2-rank GPT one): (run_dir, spec_path, CompletedProcess)."""
    return shared_run(f"sp-{shard}-{n}-{family}", LLAMA if family == "llama" else GPT, n,
                      ("parallel.sequence_parallel=true",), backend="torch", shard=shard, tp=2,
                      batch=GLOBAL // (n // 2))


# dp=2 x tp=2 with ZeRO-1 and with FSDP2 (plain dp=2 x tp=2 adds nothing the optimizer case does not run)
@pytest.mark.parametrize("n,shard,family", [(2, "none", "llama"), (2, "none", "gpt"), (4, "full", "gpt"),
                                            (4, "optimizer", "llama")])
def test_sequence_parallel_equals_one_rank_with_the_union_batch(shared_run, references, n, shard, family):
    run, _, p = sp_run(shared_run, n, shard, family)
    assert f"parallel.shard={shard} tp=2 sequence_parallel" in p.stderr, p.stderr[-2000:]
    assert_same_run(run, references / family)


def test_sequence_parallel_within_pipeline_stages(tmp_path, dataset, references):
    """pp=2 x tp=2: each stage's norms on sequence slices, each tp rank passing only its slice of the
    positions to the next stage (whose Llama rotary positions are still the whole sequence's). Llama
    only: the rotary positions are what a stage boundary can get wrong; GPT-2 adds its positions
    before the first stage, and its sequence-parallel blocks run in test_..._union_batch above."""
    spec = spec_file(tmp_path, dataset, "pp-sp", LLAMA, backend="torch", tp=2, batch=3)
    p = train(spec, 4, "parallel.pp=2", "parallel.sequence_parallel=true")
    assert "parallel.shard=none tp=2 sequence_parallel pp=2" in p.stderr, p.stderr[-2000:]
    assert_same_run(tmp_path / "pp-sp", references / "llama")


def test_sequence_parallel_checkpoint_resumes_on_one_rank(tmp_path, dataset, references, shared_run):
    """The norms are Replicate DTensors under sequence parallelism: the checkpoint holds them once, and
    its step 5 continues the uninterrupted run on one rank. (The run is the 2-rank GPT one the first
    test checked, not another.)"""
    sp, _, _ = sp_run(shared_run, 2, "none", "gpt")
    resume_copy(sp, tmp_path / "to1")
    p = train(spec_file(tmp_path, dataset, "to1", GPT, backend="single"), 1)
    assert f"resumed step {MID} from 2 rank(s) on 1 rank(s)" in p.stderr
    assert_same_run(tmp_path / "to1", references / "gpt")


def test_sequence_parallel_plans_that_cannot_run_are_config_errors(tmp_path, dataset):
    spec = spec_file(tmp_path, dataset, "bad", GPT, backend="torch", tp=2)
    err = _fails(spec, 1, "parallel.tp=1", "parallel.sequence_parallel=true")
    assert "parallel.sequence_parallel=true needs parallel.tp > 1" in err
    err = _fails(spec, 2, "parallel.sequence_parallel=true", "train.seq_len=31")
    assert "parallel.sequence_parallel=true needs train.seq_len (31) to be a multiple of parallel.tp=2" in err


def test_plan_dry_run_mentions_sequence_parallel(tmp_path):
    spec = tmp_path / "sp.yaml"
    spec.write_text(json.dumps({"kind": "train", "name": "sp", "model": {"arch": "llama", "size": "llama3-8b"},
                                "parallel": {"shard": "full", "tp": 8, "sequence_parallel": True},
                                "train": {"global_batch_size": 64, "batch_size": 1, "seq_len": 8192},
                                "slurm": {"nodes": 8, "tasks_per_node": 8}}))
    out = subprocess.run([sys.executable, "-m", "hpcllm.cli", "plan", str(spec)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "sequence parallel: norms, dropout and residual adds on 1024 of the 8192 positions per rank" in out.stdout
