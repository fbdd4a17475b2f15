"""`hpcllm submit` through submitit on the local Slurm: a 2-task training job, a chain, a dry run."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hpcllm.launch.submit import minutes
from tests.slurm_util import require_slurm, run, sacct_rows, slurm_env, wait_job

REPO = Path(__file__).resolve().parents[2]


def test_minutes():
    assert [minutes(t) for t in ("30", "01:00:00", "1-00:00:00", "00:00:30", "2:30")] == [30, 60, 1440, 1, 3]


def specs(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"{i}.txt").write_text(f"document {i} " + "alpha beta gamma " * (150 + 9 * i))
    prep = {"kind": "prepare", "name": "chain-prep", "run_dir": str(tmp_path / "prep"),
            "data": {"inputs": [str(corpus)], "dataset": str(tmp_path / "ds"), "val_fraction": 0.2},
            "slurm": {"tasks_per_node": 2, "time": "00:03:00"}}
    train = {"kind": "train", "name": "chain-train", "run_dir": str(tmp_path / "train"),
             "data": {"dataset": str(tmp_path / "ds")}, "dist": {"timeout_s": 60},
             "model": {"size": "custom", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 64},
             "train": {"max_steps": 6, "batch_size": 2, "seq_len": 32, "log_interval": 2, "eval_interval": 0,
                       "progress": False},
             "slurm": {"tasks_per_node": 2, "time": "00:03:00"}}
    (tmp_path / "prep.yaml").write_text(json.dumps(prep))
    (tmp_path / "train.yaml").write_text(json.dumps(train))
    return tmp_path / "prep.yaml", tmp_path / "train.yaml"


def hpcllm_submit(*args):
    return subprocess.run([sys.executable, "-m", "hpcllm.cli", "submit", *args], capture_output=True, text=True,
                          env=slurm_env(), cwd=REPO, timeout=120)


def test_dry_run_submits_nothing(tmp_path):
    prep, train = specs(tmp_path)
    p = hpcllm_submit(str(prep), str(train), "--chain", "--dry-run")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("would submit (dry run, nothing submitted)") == 2
    assert "#SBATCH --ntasks-per-node=2" in p.stdout and "--mpi=pmix" in p.stdout
    assert "#SBATCH --dependency='afterok:<previous job id>'" in p.stdout
    assert "#SBATCH --signal=USR2@90" in p.stdout  # the default 120 s, cut to half the 3-minute limit
    assert not (tmp_path / "train" / "submitit").exists()


@pytest.mark.slurm
def test_chain_prepare_then_train_through_submitit(tmp_path):
    require_slurm()
    prep, train = specs(tmp_path)
    p = hpcllm_submit(str(prep), str(train), "--chain")
    assert p.returncode == 0, p.stderr
    ids = re.findall(r"submitted \w+ job '[^']+' as (\d+)", p.stdout)
    assert len(ids) == 2 and f"(after {ids[0]})" in p.stdout
    assert wait_job(ids[0], 120) == "COMPLETED"
    assert wait_job(ids[1], 180) == "COMPLETED", list((tmp_path / "train" / "submitit").rglob("*.err"))
    assert (tmp_path / "ds" / "manifest.json").exists()
    assert (tmp_path / "train" / "checkpoints" / "step_00000006" / "model.safetensors").exists()
    steps = [json.loads(x)["step"] for x in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]
    start = run(["sacct", "-X", "-n", "-P", "-j", ids[1], "-o", "Start"]).stdout.strip()
    end = run(["sacct", "-X", "-n", "-P", "-j", ids[0], "-o", "End"]).stdout.strip()
    assert start >= end  # ISO timestamps: the train job started after prepare ended
    assert {r["State"] for r in sacct_rows(ids[1])} == {"COMPLETED"}
    log = (tmp_path / "train" / "submitit" / ids[1] / f"{ids[1]}_0_log.err").read_text()
    assert "2 rank(s), backend mpi" in log
    # hpcllm jobs / logs
    j = subprocess.run([sys.executable, "-m", "hpcllm.cli", "jobs", str(tmp_path / "prep"), str(tmp_path / "train")],
                       capture_output=True, text=True, env=slurm_env())
    assert j.returncode == 0, j.stderr
    lines = {line.split()[0]: line.split() for line in j.stdout.splitlines()[1:]}
    assert lines[ids[0]][1:2] == ["prepare"] and "COMPLETED" in lines[ids[0]]
    assert lines[ids[1]][1:2] == ["train"] and "COMPLETED" in lines[ids[1]]
    lg = subprocess.run([sys.executable, "-m", "hpcllm.cli", "logs", ids[1], str(tmp_path / "train"), "--err"],
                        capture_output=True, text=True)
    assert lg.returncode == 0 and "2 rank(s), backend mpi" in lg.stdout
    lg = subprocess.run([sys.executable, "-m", "hpcllm.cli", "logs", ids[1], str(tmp_path / "train"), "--rank", "7"],
                        capture_output=True, text=True)
    assert lg.returncode == 1 and "rank 7 does not exist" in lg.stderr


@pytest.mark.slurm
def test_inference_job_array_with_a_failed_task_retried(tmp_path):
    """5 prompt shards over 3 array tasks; one shard is corrupt at first, so its task fails and no
    output manifest is written; after the shard is repaired, resubmitting finishes only what is left,
    and the outputs equal a single-process run."""
    require_slurm()
    import shutil

    from hpcllm.model import GPT, ModelConfig, save_hf_gpt2
    from tests.infer.test_job import outputs

    save_hf_gpt2(GPT(ModelConfig(size="custom", n_layer=1, n_head=2, n_embd=32, block_size=64,
                                 vocab_size=258)).init_weights(1), tmp_path / "model")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"id": i, "text": f"prompt {i} " * (1 + i % 3)})
                                                for i in range(10)) + "\n")
    (tmp_path / "prep.yaml").write_text(json.dumps({"kind": "prepare", "run_dir": str(tmp_path / "pr"), "data": {
        "inputs": [str(tmp_path / "p.jsonl")], "output": "prompts", "id_field": "id", "prompts_per_shard": 2,
        "dataset": str(tmp_path / "prompts")}}))
    assert subprocess.run([sys.executable, "-m", "hpcllm.cli", "prepare", str(tmp_path / "prep.yaml")],
                          capture_output=True).returncode == 0
    infer = {"mode": "generate", "model": str(tmp_path / "model"), "prompts": str(tmp_path / "prompts"),
             "max_new_tokens": 6, "temperature": 0.7, "seed": 2, "batch_size": 4}
    (tmp_path / "ref.yaml").write_text(json.dumps({"kind": "infer", "name": "ref", "run_dir": str(tmp_path / "ref"),
                                                   "infer": infer}))
    assert subprocess.run([sys.executable, "-m", "hpcllm.cli", "infer", str(tmp_path / "ref.yaml")],
                          capture_output=True).returncode == 0
    spec = tmp_path / "arr.yaml"
    spec.write_text(json.dumps({"kind": "infer", "name": "arr", "run_dir": str(tmp_path / "arr"), "infer": infer,
                                "slurm": {"array_tasks": 3, "array_parallelism": 2, "time": "00:03:00"}}))
    shard = tmp_path / "prompts" / "prompts-00001.h5"
    good = shard.read_bytes()
    shutil.copy(shard, tmp_path / "keep.h5")
    shard.write_bytes(good[:300] + b"\0" * (len(good) - 300))  # same size, corrupt content
    p = hpcllm_submit(str(spec))
    assert p.returncode == 0, p.stderr
    job = re.findall(r"as (\d+) \(3 array tasks\)", p.stdout)[0]
    states = {i: wait_job(f"{job}_{i}", 120) for i in range(3)}
    assert states == {0: "COMPLETED", 1: "FAILED", 2: "COMPLETED"}, states
    out = tmp_path / "arr" / "outputs"
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.glob("*.done")) == ["out-00000.h5.done", "out-00002.h5.done",
                                                          "out-00003.h5.done"]
    shard.write_bytes(good)  # repaired: retry
    p = hpcllm_submit(str(spec))
    job = re.findall(r"as (\d+) \(3 array tasks\)", p.stdout)[0]
    assert all(wait_job(f"{job}_{i}", 120) == "COMPLETED" for i in range(3))
    assert (out / "manifest.json").exists()
    assert outputs(tmp_path / "arr") == outputs(tmp_path / "ref")


@pytest.mark.slurm
def test_debug_prints_and_runs_the_job_interactively(tmp_path):
    require_slurm()
    prep, train = specs(tmp_path)
    assert subprocess.run([sys.executable, "-m", "hpcllm.cli", "prepare", str(prep)], capture_output=True).returncode == 0
    p = subprocess.run([sys.executable, "-m", "hpcllm.cli", "debug", str(train)], capture_output=True, text=True)
    assert p.returncode == 0
    assert "salloc --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --time=00:03:00" in p.stdout
    assert "--pty" in p.stdout and "-m pdb" in p.stdout and "HPCLLM_LOG_LEVEL=debug srun --mpi=pmix" in p.stdout
    r = subprocess.run([sys.executable, "-m", "hpcllm.cli", "debug", str(train), "--run"], capture_output=True,
                       text=True, env=slurm_env(), cwd=REPO, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "train" / "checkpoints" / "step_00000006").is_dir()


def test_preflight_fails_fast_on_missing_inputs(tmp_path):
    _, train = specs(tmp_path)
    p = subprocess.run([sys.executable, "-m", "hpcllm.cli", "train", str(train)], capture_output=True, text=True)
    assert p.returncode == 2 and "data.dataset:" in p.stderr and "does not exist" in p.stderr


@pytest.mark.slurm
def test_cancel_and_hard_requeue_of_a_submitted_training_job(tmp_path):
    """scontrol requeue kills the job without warning: it restarts from its last periodic checkpoint
    and still ends with the parameters of an uninterrupted run. scancel ends it as CANCELLED."""
    require_slurm()
    import time

    from safetensors.torch import load_file

    from tests.mpi_util import run_mpi

    prep, train = specs(tmp_path)
    assert subprocess.run([sys.executable, "-m", "hpcllm.cli", "prepare", str(prep)], capture_output=True).returncode == 0
    t = json.loads(train.read_text())
    t["train"].update(max_steps=300, log_interval=1, ckpt_interval=50)
    ref = dict(t, name="ref", run_dir=str(tmp_path / "ref"))
    (tmp_path / "ref.yaml").write_text(json.dumps(ref))
    assert run_mpi(2, [sys.executable, "-m", "hpcllm.cli", "train", str(tmp_path / "ref.yaml")]).returncode == 0
    train.write_text(json.dumps(t))
    job = re.findall(r"as (\d+)", hpcllm_submit(str(train)).stdout)[0]
    ckpts = tmp_path / "train" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpts.exists() and any(ckpts.iterdir())):
        time.sleep(0.5)
    assert run(["scontrol", "requeue", job]).returncode == 0
    assert wait_job(job, 240) == "COMPLETED"
    a = load_file(str(tmp_path / "ref" / "checkpoints" / "step_00000300" / "model.safetensors"))
    b = load_file(str(ckpts / "step_00000300" / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)
    # cancel
    t["train"]["max_steps"] = 100000
    train.write_text(json.dumps(dict(t, run_dir=str(tmp_path / "long"))))
    job = re.findall(r"as (\d+)", hpcllm_submit(str(train)).stdout)[0]
    deadline = time.time() + 60
    while time.time() < deadline and not (tmp_path / "long" / "metrics.jsonl").exists():
        time.sleep(0.5)
    assert run(["scancel", job]).returncode == 0
    assert wait_job(job, 60) == "CANCELLED"


@pytest.mark.slurm
def test_training_job_stops_before_its_time_limit_requeues_and_resumes(tmp_path):
    """A real 1-minute time limit: each start trains until end_time_margin_s before SLURM_JOB_END_TIME,
    checkpoints, and requeues itself; the restart resumes from that checkpoint. With max_requeues=1 the
    second stop is not requeued: the job fails with a message saying where to continue from."""
    require_slurm()
    prep, train = specs(tmp_path)
    assert subprocess.run([sys.executable, "-m", "hpcllm.cli", "prepare", str(prep)], capture_output=True).returncode == 0
    t = json.loads(train.read_text())
    t["train"].update(max_steps=1_000_000, log_interval=50, ckpt_interval=0, end_time_margin_s=45)
    t["slurm"].update(time="00:01:00", max_requeues=1)
    train.write_text(json.dumps(t))
    job = re.findall(r"as (\d+)", hpcllm_submit(str(train)).stdout)[0]
    assert wait_job(job, 150) == "FAILED"
    logs = tmp_path / "train" / "submitit" / job
    out = (logs / f"{job}_0_log.out").read_text() + (logs / f"{job}_0_log.err").read_text()
    # Slurm's USR2 (--signal=USR2@30: the default 120 s cut to half the limit; Slurm may send it up to a
    # minute early, so it comes before our own margin, which is cut to ~30 s before the limit)
    stops = re.findall(r"stopping at step \d+ \((signal SIGUSR2|within 45 s of the Slurm time limit)\)", out)
    assert len(stops) == 2, out[-3000:]
    assert "requeueing job" in out and "resumed from" in out
    assert "not requeued (restart 1, max_requeues 1): submit again" in out and "Traceback" not in out, out[-3000:]
    states = run(["sacct", "-j", job, "-X", "-n", "-D", "-P", "-o", "State"]).stdout.split()
    assert states.count("REQUEUED") == 1, states
    steps = sorted(int(p.name.split("_")[1]) for p in (tmp_path / "train" / "checkpoints").iterdir())
    assert len(steps) == 2 and 0 < steps[0] < steps[1], steps  # the second start went on from the first
