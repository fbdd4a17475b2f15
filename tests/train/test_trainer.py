"""The training job end to end: CLI on 1 and 2 ranks, exact resume, signal checkpoint + requeue
status, NaN abort, a killed rank ends the job."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.train.corpus import prepare_python_corpus
from tests.mpi_util import mpi_env, mpirun_cmd, run_mpi

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return prepare_python_corpus(tmp_path_factory.mktemp("train"), val_fraction=0.2)


def train_spec(tmp_path, dataset, name="t", **train):
    t = {"max_steps": 12, "batch_size": 2, "seq_len": 32, "lr": 3e-3, "warmup_steps": 2, "eval_interval": 6,
         "eval_batches": 2, "log_interval": 1, "ckpt_interval": 4, "progress": False, **train}
    spec = {"kind": "train", "name": name, "run_dir": str(tmp_path / name),
            "dist": {"timeout_s": 30, "bucket_mb": 0.05}, "data": {"dataset": str(dataset)},
            "model": {"size": "custom", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64}, "train": t}
    p = tmp_path / f"{name}.yaml"
    p.write_text(json.dumps(spec))
    return p


def hpcllm(*args, n=1, timeout=180, env=None):
    cmd = [sys.executable, "-m", "hpcllm.cli", *args]
    if n == 1:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    return run_mpi(n, cmd, timeout=timeout, env=env)


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir):
    from hpcllm.checkpoint import read_checkpoint_model

    ckpts = sorted((Path(run_dir) / "checkpoints").iterdir())
    return read_checkpoint_model(ckpts[-1]), ckpts[-1].name


@pytest.mark.mpi
def test_two_ranks_train_falling_loss_metrics_plot(tmp_path, dataset):
    # the straggler thresholds of tests/train/test_stragglers.py's slowed run: without its hook, none is named
    spec = train_spec(tmp_path, dataset, max_steps=24, lr=1e-2, stragglers={"threshold": 1.0, "steps": 16})
    p = hpcllm("train", str(spec), n=2)
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "t"
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "straggler" not in p.stdout + p.stderr and not any("stragglers" in r for r in recs)
    assert all(len(r["busy_s_ranks"]) == 2 and min(r["busy_s_ranks"]) > 0 for r in recs)
    assert [r["step"] for r in recs] == list(range(1, 25))
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.5
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    assert len(vals) == 4 and vals[-1] < vals[0]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in recs)  # CPU: peak unknown, no MFU
    assert sorted(x.name for x in (run / "checkpoints").iterdir()) == ["step_00000020", "step_00000024"]  # keep 2
    assert (run / "logs" / "rank0.log").exists() and (run / "logs" / "rank1.log").exists()
    png = hpcllm("plot", str(run))
    assert png.returncode == 0 and (run / "training.png").read_bytes()[:4] == b"\x89PNG"


def test_crash_then_exact_resume_bitwise(tmp_path, dataset):
    full = train_spec(tmp_path, dataset, name="full", max_steps=200)
    assert hpcllm("train", str(full)).returncode == 0
    part = train_spec(tmp_path, dataset, name="part", max_steps=200)
    proc = subprocess.Popen([sys.executable, "-m", "hpcllm.cli", "train", str(part)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "part" / "metrics.jsonl"
    while proc.poll() is None and (not metrics.exists() or len(metrics.read_text().splitlines()) < 10):
        time.sleep(0.05)
    proc.kill()  # a crash: no goodbye, no final checkpoint
    proc.wait()
    crashed_at = len(metrics.read_text().splitlines())
    assert 10 <= crashed_at < 200, "the run finished before it could be killed"
    r = hpcllm("train", str(part))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stderr
    assert losses(tmp_path / "part") == losses(tmp_path / "full")  # bitwise, and metrics read as one run
    (wa, na), (wb, nb) = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert na == nb == "step_00000200"
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.mpi
def test_signal_checkpoints_and_exits_for_requeue_then_resumes_exactly(tmp_path, dataset):
    ref = train_spec(tmp_path, dataset, name="ref", max_steps=300, ckpt_interval=0, eval_interval=100)
    assert hpcllm("train", str(ref), n=2).returncode == 0
    sig = train_spec(tmp_path, dataset, name="sig", max_steps=300, ckpt_interval=0, eval_interval=100)
    proc = subprocess.Popen(mpirun_cmd(2, sys.executable, "-m", "hpcllm.cli", "train", str(sig)), env=mpi_env(),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "sig" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.2)
    pids = subprocess.run(["pgrep", "-f", f"hpcllm.cli train {sig}"], capture_output=True, text=True).stdout.split()
    ranks = [p for p in pids if int(p) != proc.pid]
    assert ranks, "no rank processes found"
    os.kill(int(ranks[-1]), signal.SIGUSR2)  # one rank only: the others must agree to stop too
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 85, err[-3000:]
    # every rank names the signal, though only one got it (the ranks agree on the reason's code)
    stops = [line for line in err.splitlines() if "stopping at step" in line]
    assert len(stops) == 2 and all("(signal SIGUSR2)" in line for line in stops), stops
    stopped_at = int(sorted((tmp_path / "sig" / "checkpoints").iterdir())[-1].name.split("_")[1])
    assert 5 <= stopped_at < 300
    again = hpcllm("train", str(sig), n=2)
    assert again.returncode == 0, again.stderr[-2000:]
    assert losses(tmp_path / "sig") == losses(tmp_path / "ref")
    (wa, _), (wb, _) = weights(tmp_path / "ref"), weights(tmp_path / "sig")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_nan_loss_aborts_naming_the_step_without_checkpoint(tmp_path, dataset):
    spec = train_spec(tmp_path, dataset, name="nan", lr=1e6, warmup_steps=1, grad_clip=0.0, ckpt_interval=1)
    p = hpcllm("train", str(spec))
    assert p.returncode == 7
    assert "loss is not finite at step" in p.stderr and "Traceback" not in p.stderr
    bad_step = int(p.stderr.split("loss is not finite at step ")[1].split()[0])
    # steps are numbered as logged and checkpointed: the last checkpoint is the step before the bad one
    ckpts = sorted(int(x.name.split("_")[1]) for x in (tmp_path / "nan" / "checkpoints").iterdir())
    assert ckpts[-1:] == ([bad_step - 1] if bad_step > 1 else []), (bad_step, ckpts)
    assert f"no checkpoint written after step {bad_step - 1}" in p.stderr
    steps = [json.loads(line)["step"] for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, bad_step)), "the logged steps end just before the bad one"
    skip = hpcllm("train", str(spec), "train.nan_policy=skip", "train.resume=false", "run_dir=" + str(tmp_path / "skip"))
    assert skip.returncode == 0 and "non-finite loss, step skipped" in skip.stderr


def test_logged_losses_are_identical_after_a_resume_between_log_lines(tmp_path, dataset):
    import shutil

    # logged every 10 steps, checkpointed every 5: a run that resumes from step 15 must log the mean
    # over steps 11-20 at step 20, as the uninterrupted run does, not the mean over 16-20
    kw = dict(max_steps=30, log_interval=10, ckpt_interval=5, keep_checkpoints=10, eval_interval=0)
    full = train_spec(tmp_path, dataset, name="whole", **kw)
    assert hpcllm("train", str(full)).returncode == 0
    resumed = train_spec(tmp_path, dataset, name="again", **kw)
    shutil.copytree(tmp_path / "whole", tmp_path / "again")
    for c in (tmp_path / "again" / "checkpoints").iterdir():
        if int(c.name.split("_")[1]) > 15:  # as if the run had died between steps 15 and 20
            shutil.rmtree(c)
    r = hpcllm("train", str(resumed))
    assert r.returncode == 0 and "resumed from" in r.stderr and "step_00000015" in r.stderr, r.stderr[-2000:]
    recs = [json.loads(line) for line in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == [10, 20, 30]
    assert losses(tmp_path / "again") == losses(tmp_path / "whole")  # bitwise


@pytest.fixture(scope="module")
def trained4(dataset, tmp_path_factory):
    """One 4-step run (checkpoint at step 4) for the tests that resume from it and fail: one launch,
    not one per test. A test gets its own copy (the trust test damages its checkpoint)."""
    root = tmp_path_factory.mktemp("trained4")
    spec = train_spec(root, dataset, name="t4", max_steps=4, eval_interval=0)
    p = hpcllm("train", str(spec))
    assert p.returncode == 0, p.stderr[-2000:]
    return root / "t4"


def _trained(tmp_path, dataset, name, trained4):
    import shutil

    shutil.copytree(trained4, tmp_path / name)
    spec = train_spec(tmp_path, dataset, name=name, max_steps=4, eval_interval=0)
    return spec, tmp_path / name / "checkpoints" / "step_00000004"


class NotATensor:  # pickled into a state.pt: the weights-only unpickler must refuse it
    pass


@pytest.mark.mpi
def test_resume_with_another_model_shape_is_one_line_on_every_rank_count(tmp_path, dataset, trained4):
    spec, _ = _trained(tmp_path, dataset, "shape", trained4)
    for n in (1, 2):
        p = hpcllm("train", str(spec), "model.n_embd=48", n=n)
        assert p.returncode == 6, p.stderr[-3000:]
        assert "is (" in p.stderr and "in the checkpoint but" in p.stderr and "model.*" in p.stderr
        assert "Traceback" not in p.stderr and "size mismatch" not in p.stderr, p.stderr[-3000:]
        assert p.stderr.count("hpcllm train: error") == n  # one line per rank, each naming the file
    p = hpcllm("train", str(spec), "model.block_size=128")
    assert p.returncode == 6 and "transformer.wpe.weight" in p.stderr and "Traceback" not in p.stderr


def test_untrusted_or_unreadable_checkpoints_are_refused_in_one_line(tmp_path, dataset, trained4):
    from hpcllm.checkpoint import load_trained_model
    from hpcllm.errors import CheckpointError

    spec, ckpt = _trained(tmp_path, dataset, "trust", trained4)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    torch.save({**state, "extra": NotATensor()}, ckpt / "state.pt")  # would run code on a full unpickle
    p = hpcllm("train", str(spec), "train.max_steps=6")
    assert p.returncode == 6, p.stderr[-2000:]
    assert "state.pt: not a trusted checkpoint" in p.stderr and "Traceback" not in p.stderr
    assert "weights_only" not in p.stderr  # never suggest unsafe loading
    import pickle

    index = ckpt / "dcp" / ".metadata"
    good = index.read_bytes()
    index.write_bytes(pickle.dumps(NotATensor()))  # the index is a pickle: only DCP's own classes may load
    with pytest.raises(CheckpointError, match=r"dcp/.metadata: not a trusted checkpoint index"):
        load_trained_model(tmp_path / "trust")
    index.write_bytes(good)
    shard = next((ckpt / "dcp").glob("*.distcp"))
    shard.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"dcp: cannot be read"):
        load_trained_model(tmp_path / "trust")


@pytest.mark.mpi
def test_killed_rank_ends_the_job(tmp_path, dataset):
    spec = train_spec(tmp_path, dataset, name="kill", max_steps=100000, ckpt_interval=0, log_interval=1)
    proc = subprocess.Popen(mpirun_cmd(2, sys.executable, "-m", "hpcllm.cli", "train", str(spec), "dist.timeout_s=10"),
                            env=mpi_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "kill" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    pids = subprocess.run(["pgrep", "-f", f"hpcllm.cli train {spec}"], capture_output=True, text=True).stdout.split()
    ranks = [int(p) for p in pids if int(p) != proc.pid]
    t0 = time.time()
    os.kill(ranks[-1], signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert time.time() - t0 < 10 + 20  # within dist.timeout_s (plus the watchdog's grace)


def test_wrong_kind_and_missing_dataset_are_clear(tmp_path, dataset):
    spec = train_spec(tmp_path, dataset)
    p = hpcllm("train", str(spec), "data.dataset=/nope")
    assert p.returncode == 10 and "data.dataset: '/nope' does not exist" in p.stderr
    p = hpcllm("train", str(spec), "kind=infer")
    assert p.returncode == 2 and "runs kind: train" in p.stderr


def test_compiled_training_matches_eager(tmp_path, dataset):
    # torch.compile is what a GPU run uses; on CPU (fp32) its losses must agree with eager ones
    eager = train_spec(tmp_path, dataset, name="eager", max_steps=6, eval_interval=0)
    compiled = train_spec(tmp_path, dataset, name="compiled", max_steps=6, eval_interval=0, compile=True)
    assert hpcllm("train", str(eager)).returncode == 0
    p = hpcllm("train", str(compiled), timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(a) == len(b) == 6
    assert all(abs(x - y) <= 1e-4 * abs(x) for x, y in zip(a, b)), (a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gpu_bf16_training_learns_reports_mfu_and_resumes(tmp_path, dataset, compiled):
    spec = train_spec(tmp_path, dataset, max_steps=40, lr=1e-2, ckpt_interval=20, compile=compiled)
    p = hpcllm("train", str(spec), "dist.device=cuda", timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "t"
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 41))
    first, last = sum(r["loss"] for r in recs[:5]) / 5, sum(r["loss"] for r in recs[-5:]) / 5
    assert last < first - 0.5, (first, last)
    name = torch.cuda.get_device_name()
    if any(k in name for k in ("H100", "H200", "A100")):  # a device in the peak table: MFU is reported
        assert all(0 < r["mfu"] < 1 for r in recs), recs[-1]
    r = hpcllm("train", str(spec), "dist.device=cuda", "train.max_steps=50", timeout=600)
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-3000:]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, 51))
    w, ckpt = weights(run)
    assert ckpt == "step_00000050" and all(torch.isfinite(v).all() for v in w.values())
