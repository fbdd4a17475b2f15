"""Pipeline parallelism (parallel.pp) on real ranks with gloo, through the CLI: pp=2 for both families
(GPT-2's tied embedding on the first and the last stage) under GPipe and 1F1B, dp=2 x pp=2, ZeRO-1 or
FSDP2 within each stage, and pp=2 x tp=2, each give the losses and weights of one rank with the union batch, and an
evaluation the val_loss of one rank; a pp=2 checkpoint resumes at pp=1 and a pp=1 one at pp=2,
continuing the uninterrupted run, and exports the whole model; a rank's parameters at pp=2 are about
half of pp=1's and equal to `hpcllm plan`'s estimate; plans that cannot run are one-line config
errors naming the field. The interleaved schedule (2 stages per rank, 4-layer models, 10 steps):
gpt and llama give one rank's run, gpt its val_loss, and a checkpoint of it resumes on one rank;
dp=2 x interleaved pp=2 with FSDP2 continues a one-rank checkpoint; its config errors and dry run.
Looped BFS (the same stages, breadth first): one rank's run, alone and with dp=2 x ZeRO-1 or FSDP2."""

import json
import re
import subprocess
import sys

import pytest

from hpcllm.config import load_spec
from hpcllm.errors import ConfigError
from hpcllm.parallel.cli import model_for_plan
from hpcllm.parallel.estimate import estimate_memory
from tests.train.test_sharded import GPT, LLAMA, MID, STEPS, assert_same_run, metrics, resume_copy, spec_file, train
from tests.train.test_tensor_parallel import _fails, assert_estimate

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


def pp_run(shared_run, n: int, shard: str, tp: int, family: str, schedule: str):
    """The plan's pp=2 run with the union batch, once per module (the resume test below continues the
    2-rank GPT 1F1B one): (run_dir, spec_path, CompletedProcess)."""
    dp = n // (2 * tp)
    evaluated = (n, family, schedule) == (2, "gpt", "gpipe")
    return shared_run(f"pp2-{schedule}-{shard}-tp{tp}-{n}-{family}", LLAMA if family == "llama" else GPT, n,
                      ("parallel.pp=2", f"parallel.pp_schedule={schedule}",
                       *([f"train.eval_interval={MID}"] if evaluated else [])),
                      backend="torch", shard=shard, tp=tp, batch=3 if dp == 1 else 1)


# (ranks, parallel.shard, tp, family, schedule): 2 ranks are one pipeline of 2 stages (3 sequences x 2
# micro-batches); 4 ranks are dp=2 x pp=2 (1 sequence x 3 micro-batches per pipeline), or pp=2 x tp=2.
# GPipe with GPT-2 only: a schedule orders the stages' calls, which do not depend on the family
@pytest.mark.parametrize("n,shard,tp,family,schedule", [
    (2, "none", 1, "gpt", "gpipe"), (2, "none", 1, "gpt", "1f1b"), (2, "none", 1, "llama", "1f1b"),
    (4, "none", 1, "gpt", "1f1b"), (4, "full", 1, "llama", "1f1b"), (4, "none", 2, "gpt", "1f1b"),
    (4, "optimizer", 1, "gpt", "1f1b")])
def test_pipeline_equals_one_rank_with_the_union_batch(shared_run, references, n, shard, tp, family, schedule):
    dp = n // (2 * tp)
    evaluated = (n, family, schedule) == (2, "gpt", "gpipe")
    run, spec, p = pp_run(shared_run, n, shard, tp, family, schedule)
    assert f"{dp} data-parallel rank(s)" in p.stderr and f"parallel.shard={shard} tp={tp} pp=2 ({schedule})" in p.stderr
    assert_same_run(run, references / family)
    if evaluated:  # through the pipeline's evaluation schedule: what one rank's evaluate gives
        got = {m["step"]: m["val_loss"] for m in metrics(run) if "val_loss" in m}
        assert list(got) == [MID, STEPS]
        for step, value in got.items():
            assert abs(value - one_rank_val_loss(run, step, spec)) <= 1e-5 * value, (step, value)
    got, one = metrics(run)[-1], metrics(references / family)[-1]
    if family == "llama" and shard == "none":  # untied: stage 0 holds the embedding and one of the two layers
        for key in ("params_bytes", "grads_bytes", "optimizer_bytes"):
            assert got[key] <= 0.55 * one[key], (key, got[key], one[key])
    # `hpcllm plan`'s estimate is what rank 0 (stage 0) measured
    est = estimate_memory(model_for_plan(load_spec(spec, ["parallel.pp=2"])), shard, tp, dp, 2)
    assert_estimate(got, est, shard)


def test_checkpoints_resume_across_pipeline_plans(tmp_path, dataset, references, shared_run):
    """pp=2's step 5 on one rank; one rank's step 5 at dp=2 x pp=2 with FSDP2 in each stage: both
    continue the uninterrupted run. A pp=2 checkpoint exports the whole model. (The pp=2 run is the
    2-rank GPT 1F1B one the test above checked, not another.)"""
    from safetensors.torch import load_file

    from hpcllm.checkpoint.export import export
    from tests.train.test_sharded import weights

    pp2, _, _ = pp_run(shared_run, 2, "none", 1, "gpt", "1f1b")
    resume_copy(pp2, tmp_path / "to1")
    p = train(spec_file(tmp_path, dataset, "to1", GPT, backend="single"), 1)
    assert f"resumed step {MID} from 2 rank(s) on 1 rank(s) (parallel.shard none -> none) (parallel.pp 2 -> 1)" \
        in p.stderr
    assert_same_run(tmp_path / "to1", references / "gpt")

    out = export(str(pp2), str(tmp_path / "hf"))
    exported, want = load_file(str(out / "model.safetensors")), weights(references / "gpt")
    assert sorted(exported) == sorted(want)  # every stage's tensors, the tied one once

    resume_copy(references / "llama", tmp_path / "from1")
    p = train(spec_file(tmp_path, dataset, "from1", LLAMA, backend="torch", shard="full", batch=1), 4, "parallel.pp=2")
    assert f"resumed step {MID} from 1 rank(s) on 4 rank(s) (parallel.shard none -> full) (parallel.pp 1 -> 2)" \
        in p.stderr
    assert_same_run(tmp_path / "from1", references / "llama")


def test_zero1_in_stages_resumes_from_one_rank(tmp_path, dataset, references):
    """One rank's step 5 continues at dp=2 x pp=2 with ZeRO-1 in each stage (each stage's moments
    over its two dp ranks), and its own step 10 is the uninterrupted run's."""
    resume_copy(references / "llama", tmp_path / "from1")
    p = train(spec_file(tmp_path, dataset, "from1", LLAMA, backend="torch", shard="optimizer", batch=1), 4,
              "parallel.pp=2")
    assert f"resumed step {MID} from 1 rank(s) on 4 rank(s) (parallel.shard none -> optimizer) (parallel.pp 1 -> 2)" \
        in p.stderr
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


# -- the interleaved schedule: 2 stages per rank need 4 layers (pp=2 x V=2), 10 steps ----------------
GPT4, LLAMA4 = {**GPT, "n_layer": 4}, {**LLAMA, "n_layer": 4}
STEPS4 = 10
INTERLEAVED = ("parallel.pp=2", "parallel.pp_schedule=interleaved1f1b")  # pp_virtual_stages: 2 by default


@pytest.fixture(scope="module")
def references4(dataset, tmp_path_factory):
    """One rank with the union batch for the 4-layer models, 10 steps, checkpoints at 5 and 10."""
    root = tmp_path_factory.mktemp("refs4")
    for name, model in (("llama", LLAMA4), ("gpt", GPT4)):
        train(spec_file(root, dataset, name, model, backend="single", max_steps=STEPS4, ckpt_interval=5), 1)
    return root


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_interleaved_equals_one_rank(tmp_path, dataset, references4, family):
    """pp=2 x 2 stages per rank (rank 0: stages 0 and 2, layers 0 and 2 and the embedding; rank 1:
    layers 1 and 3 and the head; GPT-2's tied embedding on both ranks): the losses and weights of one
    rank; rank 0's memory is `hpcllm plan`'s estimate. gpt: an evaluation through the pipeline gives
    one rank's val_loss, and its step-5 checkpoint resumes on one rank, continuing the run."""
    model = GPT4 if family == "gpt" else LLAMA4
    evaluated = family == "gpt"
    spec = spec_file(tmp_path, dataset, "pp2x2", model, backend="torch", batch=3, max_steps=STEPS4, ckpt_interval=5,
                     **({"eval_interval": 5} if evaluated else {}))
    p = train(spec, 2, *INTERLEAVED)
    assert "parallel.shard=none tp=1 pp=2 (interleaved1f1b, 2 stages per rank)" in p.stderr
    assert_same_run(tmp_path / "pp2x2", references4 / family, STEPS4)
    est = estimate_memory(model_for_plan(load_spec(spec, list(INTERLEAVED))), "none", 1, 1, 2, 0, 2)
    assert {k: metrics(tmp_path / "pp2x2")[-1][k] for k in est} == est
    if not evaluated:
        return
    got = {m["step"]: m["val_loss"] for m in metrics(tmp_path / "pp2x2") if "val_loss" in m}
    assert list(got) == [5, 10]
    for step, value in got.items():
        assert abs(value - one_rank_val_loss(tmp_path / "pp2x2", step, spec)) <= 1e-5 * value, (step, value)
    resume_copy(tmp_path / "pp2x2", tmp_path / "to1", at=5)
    p = train(spec_file(tmp_path, dataset, "to1", model, backend="single", max_steps=STEPS4, ckpt_interval=5), 1)
    assert "resumed step 5 from 2 rank(s) on 1 rank(s) (parallel.shard none -> none) (parallel.pp 2 x 2 stages per " \
           "rank -> 1)" in p.stderr
    assert_same_run(tmp_path / "to1", references4 / family, STEPS4)


def test_interleaved_with_data_parallel_fsdp(tmp_path, dataset, references4):
    """dp=2 x pp=2 x 2 stages per rank, FSDP2 within each stage (each chunk its own root), on 4 ranks,
    resumed from one rank's step 5 (pp=1 -> interleaved): the uninterrupted run's losses and weights."""
    resume_copy(references4 / "llama", tmp_path / "from1", at=5)
    spec = spec_file(tmp_path, dataset, "from1", LLAMA4, backend="torch", shard="full", batch=1, max_steps=STEPS4,
                     ckpt_interval=5)
    p = train(spec, 4, *INTERLEAVED)
    assert "2 data-parallel rank(s)" in p.stderr and "parallel.shard=full tp=1 pp=2 (interleaved1f1b" in p.stderr
    assert "resumed step 5 from 1 rank(s) on 4 rank(s) (parallel.shard none -> full) (parallel.pp 1 -> 2 x 2 stages " \
           "per rank)" in p.stderr
    assert_same_run(tmp_path / "from1", references4 / "llama", STEPS4)
    est = estimate_memory(model_for_plan(load_spec(spec, list(INTERLEAVED))), "full", 1, 2, 2, 0, 2)
    assert {k: metrics(tmp_path / "from1")[-1][k] for k in est} == est


@pytest.mark.parametrize("n,shard,family", [(2, "none", "llama"), (4, "optimizer", "gpt"), (4, "full", "llama")])
def test_looped_bfs_equals_one_rank(tmp_path, dataset, references4, n, shard, family):
    """pp=2 x 2 stages per rank under PyTorch's ScheduleLoopedBFS (every micro-batch through a rank's
    first stage, then its second; the backwards in reverse): one rank's losses and weights — alone,
    and with dp=2 and ZeRO-1 (GPT-2's tied embedding on rank 0's first stage and rank 1's last) or
    FSDP2 in each stage, 3 micro-batches per pipeline."""
    spec = spec_file(tmp_path, dataset, "bfs", GPT4 if family == "gpt" else LLAMA4, backend="torch", shard=shard,
                     batch=3 if n == 2 else 1, max_steps=STEPS4)
    p = train(spec, n, "parallel.pp=2", "parallel.pp_schedule=loopedbfs")
    assert f"parallel.shard={shard} tp=1 pp=2 (loopedbfs, 2 stages per rank)" in p.stderr, p.stderr[-2000:]
    assert_same_run(tmp_path / "bfs", references4 / family, STEPS4)


def test_interleaved_plans_that_cannot_run_and_the_dry_run(tmp_path, dataset):
    from hpcllm.parallel.cli import describe

    spec = spec_file(tmp_path, dataset, "bad4", LLAMA4, backend="torch", batch=3)
    assert ("parallel.pp=2 x parallel.pp_virtual_stages=3 = 6 stages is more than model.n_layer=4: each pipeline "
            "stage holds one layer or more") in _refused(spec, *INTERLEAVED, "parallel.pp_virtual_stages=3")
    assert "parallel.pp_virtual_stages=1 with pp_schedule interleaved1f1b" in \
        _refused(spec, *INTERLEAVED, "parallel.pp_virtual_stages=1")
    assert ("parallel.pp_virtual_stages=2 needs parallel.pp_schedule=interleaved1f1b or loopedbfs: 1f1b runs one "
            "stage per rank") in _refused(spec, "parallel.pp=2", "parallel.pp_virtual_stages=2")
    assert "parallel.pp_virtual_stages=1 with pp_schedule loopedbfs" in \
        _refused(spec, "parallel.pp=2", "parallel.pp_schedule=loopedbfs", "parallel.pp_virtual_stages=1")
    assert "pp_virtual_stages must be >= 1, got 0" in _refused(spec, *INTERLEAVED, "parallel.pp_virtual_stages=0")
    # torch's ScheduleInterleaved1F1B runs max(1, m // pp) equal rounds: 5 micro-batches on pp=2 are not
    assert ("parallel.pp=2 with pp_schedule interleaved1f1b needs the micro-batches per step to be a multiple of "
            "their rounds, max(1, micro-batches // pp) (PyTorch's ScheduleInterleaved1F1B), this run has 5 "
            "(train.grad_accum=5): raise train.grad_accum to 6 for 6 micro-batches") in \
        _refused(spec, *INTERLEAVED, "train.global_batch_size=0", "train.grad_accum=5")
    with pytest.raises(ConfigError, match=r"this run has 5 \(train.global_batch_size=10 / \(1 data-parallel rank\(s\) "
                                          r"x train.batch_size=2\)\): raise train.global_batch_size to 12 for 6"):
        describe(load_spec(spec, [*INTERLEAVED, "train.global_batch_size=10", "train.batch_size=2"]), 2)

    # 8 ranks: pp=4 x 2 stages per rank x dp=2; 8 micro-batches per pipeline
    out = describe(load_spec(spec, [*INTERLEAVED, "parallel.pp=4", "model.n_layer=9", "train.global_batch_size=48"]), 8)
    assert "pp=4 (interleaved1f1b, 2 stages per rank) -> mesh pp=4 x dp=2 x tp=1" in out
    assert "pp rank p on ranks [p*2, (p+1)*2) runs stages p, p+4, ... (2 per rank, 8 in all)" in out
    # 9 layers over 8 stages: stage 0 has 2; pp rank 0 runs stages 0 and 4, pp rank 3 stages 3 and 7
    assert "pp rank 0 (ranks 0..1): stage 0: embedding, layers 0..1; stage 4: layer 5;" in out
    assert "pp rank 3 (ranks 6..7): stage 3: layer 4; stage 7: layer 8, head and loss;" in out
    assert "schedule interleaved1f1b: 8 micro-batch(es) per step, bubble (pp-1)/(2 x micro-batches+pp-1) = 16%" in out
    # fewer micro-batches than ranks: each micro-batch comes round the ranks before a rank's next chunk
    out = describe(load_spec(spec, [*INTERLEAVED, "parallel.pp=4", "model.n_layer=9", "train.global_batch_size=12"]), 8)
    assert "2 micro-batch(es) per step, bubble 1 - 2 x micro-batches/(2 x pp+micro-batches-1) = 56%" in out
    # looped BFS: the same bubble, and every micro-batch's activations held at once
    out = describe(load_spec(spec, ["parallel.pp=4", "parallel.pp_schedule=loopedbfs", "model.n_layer=9",
                                    "train.global_batch_size=48"]), 8)
    assert "schedule loopedbfs: 8 micro-batch(es) per step, bubble (pp-1)/(2 x micro-batches+pp-1) = 16%" in out
    assert "activations: loopedbfs holds all 8 micro-batches' of every stage at once (1f1b and interleaved1f1b " \
           "about 4); train.activation_checkpointing cuts each to its blocks' inputs" in out
