"""Run reports on the local Slurm cluster:
- a rendered training job requeued twice — `scontrol requeue` (Slurm's SIGTERM) and `scancel --batch
  --signal=USR2` (the batch shell passes it on; the job checkpoints and requeues itself): the same
  losses and weights as an uninterrupted run, three starts with their endings, steps redone,
  recovery times, and sacct's three allocations beside the records;
- a training job one of whose ranks is killed with kill -9, then resubmitted: the killed start,
  the steps it lost, the recovery time across the resubmission;
- an inference job array whose task is cancelled mid-shard and resubmitted: the shards that start
  began and never finished are named, and the retry redoes exactly those."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from hpcllm.launch.jobs import record_submission
from tests.report.test_report import REPO
from tests.slurm_util import mpi_in_background, require_slurm, run, sbatch, slurm_env, wait_job, wait_until

pytestmark = pytest.mark.slurm

# a step takes ~25 ms on 2 ranks: a tiny model whose ranks sleep 20 ms in each (hpcllm.train.stragglers'
# test hook, passed to the job through sbatch's environment; a model sized to compute that long cost the
# suite its CPU). The job requeued twice gets USR2 once its second start logged step 200 (polled every
# 0.1 s; a signal lands within ~0.5 s, ~20 steps): 400 steps leave ~5 s of training after step 200, so
# even a signal 3 s late lands mid-run; a late one fails the test (s1 would not end "stopped (signal
# SIGUSR2), requeued"). The killed rank dies at step >= 80 within milliseconds: 240 steps are plenty there.
STEPS = 400
KILL_STEPS = 240
SLOW_STEPS = slurm_env({"HPCLLM_TEST_SLOW_RANK": "*:0.02"})


def _steps(run_dir):
    try:
        return [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return []


def _starts(run_dir) -> int:
    prov = run_dir / "provenance.jsonl"
    return prov.read_text().count('"event": "start"') if prov.exists() else 0


def _render_train(tmp_path, ds, name: str, max_requeues: int, steps: int = STEPS):
    run_dir = tmp_path / name
    spec = {"kind": "train", "name": name, "run_dir": str(run_dir), "data": {"dataset": str(ds)},
            "dist": {"timeout_s": 60},
            "model": {"size": "custom", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 64},
            "train": {"max_steps": steps, "batch_size": 2, "seq_len": 32, "log_interval": 10, "eval_interval": 0,
                      "ckpt_interval": 50, "progress": False},
            "slurm": {"tasks_per_node": 2, "time": "00:05:00", "max_requeues": max_requeues}}
    (tmp_path / f"{name}.yaml").write_text(json.dumps(spec))
    script = tmp_path / f"{name}.sbatch"
    r = subprocess.run([sys.executable, "-m", "hpcllm.cli", "render", str(tmp_path / f"{name}.yaml"), "-o",
                        str(script)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return run_dir, script.read_text()


def _report(run_dir, *args):
    p = subprocess.run([sys.executable, "-m", "hpcllm.cli", "report", str(run_dir), *args], capture_output=True,
                       text=True, cwd=REPO, env=slurm_env())
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout) if "--json" in args else p.stdout


def test_report_of_a_job_requeued_twice(tmp_path, small_ds):
    """The rendered script under both of Slurm's requeues — `scontrol requeue` (SIGTERM to the
    ranks) and USR2 sent to the batch shell only (`scancel --batch`, which the script must pass on
    to its ranks instead of dying of it) — ends with exactly what an uninterrupted run computes,
    and the report tells the three starts apart."""
    require_slurm()
    from hpcllm.checkpoint import read_checkpoint_model

    run_dir, script = _render_train(tmp_path, small_ds, "job", max_requeues=2)
    ref_dir, _ = _render_train(tmp_path, small_ds, "ref", max_requeues=0)
    # the uninterrupted reference trains on 2 ranks beside the job (CPU arithmetic on 1 thread a rank:
    # its results do not depend on the load; the job only gets slower, which leaves the signals more time)
    with mpi_in_background(2, [sys.executable, "-m", "hpcllm.cli", "train", str(tmp_path / "ref.yaml")],
                           tmp_path / "ref.log") as ref:
        job = str(sbatch(script, tmp_path, env=SLOW_STEPS))
        record_submission(run_dir, job, "train", "job", 1, cluster="hpcllm")  # as `hpcllm submit` would: for `hpcllm jobs`
        wait_until(lambda: _starts(run_dir) == 1 and any(s >= 80 for s in _steps(run_dir)), 120,
                   "first start at step 80", poll_s=0.1)
        assert run(["scontrol", "requeue", job]).returncode == 0
        wait_until(lambda: _starts(run_dir) == 2 and len(_steps(run_dir)) > 0 and _steps(run_dir)[-1] >= 200, 180,
                   "second start past step 200", poll_s=0.1)
        assert run(["scancel", "--batch", "--signal=USR2", job]).returncode == 0
        assert wait_job(job, 240) == "COMPLETED"
        assert ref.wait(240) == 0, (tmp_path / "ref.log").read_text()[-2000:]
    log = "".join(p.read_text() for p in (run_dir / "logs").glob("*.out"))
    assert "(signal SIGUSR2)" in log and "checkpointed, requeueing job" in log and "resumed from" in log
    assert f"train job {job}: complete" in log, log[-3000:]
    # exact: every logged loss (a step redone after the SIGTERM logs again, the same) and the final weights
    losses = lambda d: {(r := json.loads(x))["step"]: r["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()}
    assert losses(run_dir) == losses(ref_dir)
    a, b = (read_checkpoint_model(d / "checkpoints" / f"step_{STEPS:08d}") for d in (ref_dir, run_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    rep = _report(run_dir, "--json")
    s0, s1, s2 = rep["starts"]
    assert [s["slurm_job"] for s in rep["starts"]] == [job] * 3
    assert [s["restart_count"] for s in rep["starts"]][1:] == ["1", "2"] and s0["restart_count"] in (None, "0")
    # scontrol requeue: Slurm's SIGTERM; the ranks checkpoint and stop (or are killed after KillWait)
    assert re.fullmatch(r"(stopped \(signal SIGTERM\)|killed \(.*\)), requeued", s0["ending"]), s0["ending"]
    assert s1["ending"] == "stopped (signal SIGUSR2), requeued", s1["ending"]
    assert s2["ending"] == "finished" and rep["final_step"] == STEPS
    # the batch script's own requeue (after USR2) is recorded before scontrol ends its shell
    events = [json.loads(x) for x in (run_dir / "provenance.jsonl").read_text().splitlines()]
    assert [(e["job"], e["restart"]) for e in events if e["event"] == "requeued"] == [(job, 1)]
    for prev, s in ((s0, s1), (s1, s2)):
        assert s["steps_redone"] == max(0, prev["last_step"] - s["resumed_from_step"])
        assert 0 < s["recovery_s"] < 200
    assert 0 < rep["goodput"] < 1
    # Slurm's accounting: one allocation per start; it holds the processes' lifetimes (plus launch)
    sl = rep["slurm"]
    assert sl["available"], sl
    assert [a["job"] for a in sl["allocations"]] == [job] * 3
    assert [a["state"] for a in sl["allocations"]] == ["REQUEUED", "REQUEUED", "COMPLETED"]
    assert sl["allocated_s"] >= rep["allocated_s"] - 3 * 1.0  # whole seconds in sacct
    assert 0 < sl["goodput"] <= rep["goodput"] + 0.05
    text = _report(run_dir)
    assert f"job {job}" in text and "recovery" in text and "goodput" in text and "slurm (sacct): 3 allocation" in text
    # `hpcllm jobs`: the restarts, and the elapsed time of all three starts (sacct -D), not of the last one
    j = subprocess.run([sys.executable, "-m", "hpcllm.cli", "jobs", str(run_dir)], capture_output=True, text=True,
                       cwd=REPO, env=slurm_env())
    assert j.returncode == 0, j.stderr
    header, row = j.stdout.splitlines()
    assert header.split()[3:6] == ["STATE", "ELAPSED", "RESTARTS"]
    total = int(sum(a["elapsed_s"] for a in sl["allocations"]))
    assert row.split()[:6] == [job, "train", "job", "COMPLETED", f"00:{total // 60:02d}:{total % 60:02d}", "2"], \
        j.stdout


def _rank_pids(pattern: str) -> list[int]:
    """The job's rank processes (python), not srun or the batch shell."""
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    pids = []
    for pid in map(int, out):
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            continue
        if "python" in os.path.basename(exe):
            pids.append(pid)
    return sorted(pids)


def test_report_of_a_rank_killed_and_the_job_resubmitted(tmp_path, small_ds):
    require_slurm()
    run_dir, script = _render_train(tmp_path, small_ds, "kill9", max_requeues=0, steps=KILL_STEPS)
    job1 = str(sbatch(script, tmp_path, env=SLOW_STEPS))
    wait_until(lambda: any(s >= 80 for s in _steps(run_dir)), 120, "step 80", poll_s=0.1)
    killed_at = _steps(run_dir)[-1]
    ranks = _rank_pids(f"hpcllm.cli train {run_dir / 'train-spec.yaml'}")  # the spec the script runs
    assert len(ranks) == 2, ranks
    os.kill(ranks[-1], signal.SIGKILL)
    assert wait_job(job1, 120) == "FAILED"
    job2 = str(sbatch(script, tmp_path))  # the user submits it again
    assert wait_job(job2, 240) == "COMPLETED"

    rep = _report(run_dir, "--json")
    s0, s1 = rep["starts"]
    assert (s0["slurm_job"], s1["slurm_job"]) == (job1, job2)
    assert s0["ending"].startswith(("killed", "crashed")) and "requeued" not in s0["ending"], s0["ending"]
    assert s0["last_step"] >= killed_at
    assert s1["resumed_from_step"] == (s0["last_step"] // 50) * 50
    assert s1["steps_redone"] == s0["last_step"] - s1["resumed_from_step"]
    assert s1["ending"] == "finished" and rep["final_step"] == KILL_STEPS
    assert 0 < s1["recovery_s"] < 200 and s1["recovery_s"] > s1["startup_s"]  # the resubmission is in it
    assert [r["rank"] for r in s0["per_rank"]][:1] == [0] and all(r["cpu_s"] > 0 for r in s0["per_rank"])
    assert [a["job"] for a in rep["slurm"]["allocations"]] == [job1, job2]
    assert [a["state"] for a in rep["slurm"]["allocations"]] == ["FAILED", "COMPLETED"]


def test_report_of_an_inference_array_with_a_task_retried(tmp_path):
    """6 prompt shards over 2 array tasks of 2 ranks (task 0: shards 0, 2, 4); task 0 is cancelled
    while its last shard is in progress, the job is submitted again: the report names the shards the
    cancelled start began and did not finish, and the retried task redid exactly those."""
    require_slurm()
    from hpcllm.model import ModelConfig, build_model, save_hf_model
    from tests.launch.test_submit import hpcllm_submit

    # sized so that a shard takes a few seconds here: the cancel lands inside one
    save_hf_model(build_model(ModelConfig(size="custom", n_layer=4, n_head=4, n_embd=256, block_size=256,
                                          vocab_size=258).resolve()).init_weights(1), tmp_path / "model")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"id": i, "text": f"prompt {i} " * (1 + i % 3)}) + "\n"
                                              for i in range(96)))
    (tmp_path / "prep.yaml").write_text(json.dumps({"kind": "prepare", "run_dir": str(tmp_path / "pr"), "data": {
        "inputs": [str(tmp_path / "p.jsonl")], "output": "prompts", "id_field": "id", "prompts_per_shard": 16,
        "dataset": str(tmp_path / "prompts")}}))
    assert subprocess.run([sys.executable, "-m", "hpcllm.cli", "prepare", str(tmp_path / "prep.yaml")],
                          capture_output=True).returncode == 0
    run_dir = tmp_path / "arr"
    spec = tmp_path / "arr.yaml"
    spec.write_text(json.dumps({"kind": "infer", "name": "arr", "run_dir": str(run_dir), "infer": {
        "mode": "generate", "model": str(tmp_path / "model"), "prompts": str(tmp_path / "prompts"),
        "max_new_tokens": 96, "temperature": 0.7, "seed": 2, "batch_size": 4},
        "slurm": {"array_tasks": 2, "array_parallelism": 1, "tasks_per_node": 2, "time": "00:05:00"}}))
    p = hpcllm_submit(str(spec))
    assert p.returncode == 0, p.stderr
    job = re.findall(r"as (\d+) \(2 array tasks\)", p.stdout)[0]
    out = run_dir / "outputs"
    # a shard has taken ~1.4 s here (also with the machine loaded): poll often, so that the kill is sent at
    # once and lands inside it (with 0.5 s polls it once came after the shard was done)
    wait_until(lambda: (out / "out-00004.h5.begun").exists(), 120, "task 0 begins its last shard", poll_s=0.02)
    assert run(["scancel", "--signal=KILL", f"{job}_0"]).returncode == 0  # its ranks die at once
    wait_job(f"{job}_0", 60)
    lost = sorted(p.name[: -len(".begun")] for p in out.glob("*.begun") if not (out / (p.name[: -6] + ".done")).exists())
    assert "out-00004.h5" in lost
    assert wait_job(f"{job}_1", 180) == "COMPLETED"
    p = hpcllm_submit(str(spec))
    job2 = re.findall(r"as (\d+) \(2 array tasks\)", p.stdout)[0]
    assert all(wait_job(f"{job2}_{i}", 180) == "COMPLETED" for i in range(2))
    assert (out / "manifest.json").exists()

    rep = _report(run_dir, "--json")
    cancelled, task1, retry0, retry1 = rep["starts"]
    assert [s["array_task"] for s in rep["starts"]] == ["0", "1", "0", "1"]
    assert cancelled["ending"].startswith("killed (no end record: scancel") and cancelled["shards_lost"] == lost
    # array tasks by Slurm's name for them (ARRAY_TASK), not by their own job ids
    assert [s["slurm_name"] for s in rep["starts"]] == [f"{job}_0", f"{job}_1", f"{job2}_0", f"{job2}_1"]
    assert sorted(rep["shards_redone"]) == lost
    assert all(starts == [cancelled["start"], retry0["start"]] for starts in rep["shards_redone"].values())
    assert retry0["shards_done"] == len(lost) and retry1["shards_done"] == 0 and retry1["shards_skipped"] == 3
    assert task1["shards_done"] == 3 and task1["ending"] == "finished" and task1["shards_lost"] == []
    assert rep["shards"] == 6 and rep["shard_seconds"]["max"] >= rep["shard_seconds"]["p50"] > 0
    for s in (task1,):  # two ranks shared three shards: one did two of them
        assert set(s["rank_busy_s"]) == {"0", "1"} and 1.0 <= s["load_balance"] <= 2.0
    text = _report(run_dir)
    assert "shards redone: " + lost[0] in text and "begun and not finished" in text
    assert f" job {job}_0, 2 rank(s): killed" in text and f" job {job2}_1, 2 rank(s): finished" in text, text
