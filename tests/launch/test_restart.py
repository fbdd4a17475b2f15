"""In-job restarts on the local 2-node cluster (nodes n1, n2: HPCLLM_SLURM_NODES=2 slurm/local/start.sh):
a training job whose rank is hung or killed goes on inside the same allocation (`--no-kill`), without
that node, from its last checkpoint, with no requeue (hpcllm.launch.recover).

- 2 nodes x 1 task, rank 1 (on n2) stopped with SIGSTOP: the watchdog names it, the job restarts on
  n1 alone (1 rank, the global batch kept): the losses are an uninterrupted run's, and the report
  shows one in-job restart with its recovery time;
- 2 nodes x 1 task, n2 set DOWN (`scontrol update`, what slurmctld does to a node that stopped
  answering; given back at the end): the job keeps its allocation and goes on on n1;
- 1 node + 1 spare, submitted through `hpcllm submit` (submitit's batch script: the other path),
  rank 0 (on n1) killed with kill -9: the spare n2 takes over on the same world size and the final
  weights equal an uninterrupted run's bitwise.
- an inference job (2 nodes x 1 task, dynamic schedule) whose rank on n2 is killed finishes its
  shards on n1: the outputs are one process's.
The recovery time of these runs, in parts, is in docs/performance.md.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hpcllm.provenance import read_records
from hpcllm.train.metrics import read_metrics as metrics  # polled while a rank writes: a torn last line is skipped
from tests.launch.test_two_node import ENV, REPO, checkpoint_steps, controller_fields, job_output, local_env, \
    root, submit, weights, write_spec  # noqa: F401 - root: the 2-node cluster's fixture (a prepared dataset)
from tests.slurm_util import run, wait_job, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.mpi, pytest.mark.xdist_group("slurm-2node")]

STEPS = 200  # ~0.03 s a step here: the failure lands mid-run, a few steps after a checkpoint
CKPT = 20
RTOL = 1e-5  # the elastic tests' (tests/train/test_sharded.py): a wrong batch differs by far more


def spec(root: Path, name: str, *, nodes: int, spare: int = 0, global_batch: int = 4) -> dict:
    # min_lr == lr: a constant learning rate after warmup; log_interval 1: every step's loss is logged
    return {"kind": "train", "name": name, "run_dir": str(root / name), "data": {"dataset": str(root / "ds")},
            "dist": {"backend": "mpi", "timeout_s": 6, "bucket_mb": 0.05},
            "model": {"size": "custom", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 64},
            "train": {"max_steps": STEPS, "global_batch_size": global_batch, "batch_size": 2, "seq_len": 32,
                      "lr": 3e-3, "min_lr": 3e-3, "warmup_steps": 2, "eval_interval": 0, "log_interval": 1,
                      "ckpt_interval": CKPT, "keep_checkpoints": 100, "progress": False},
            "slurm": {"nodes": nodes, "spare_nodes": spare, "tasks_per_node": 1, "time": "00:10:00",
                      "max_restarts": 2}}


def reference(root: Path, s: dict) -> subprocess.Popen:
    """The uninterrupted run of spec s, in one process here (backend single; global batch kept)."""
    ref = dict(s, name=s["name"] + "-ref", run_dir=s["run_dir"] + "-ref", dist=dict(s["dist"], backend="single"))
    return subprocess.Popen([sys.executable, "-m", "hpcllm.cli", "train", str(write_spec(root, ref))], cwd=REPO,
                            env=local_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def rank_pid(run_dir: Path, rank: int) -> int:
    """The pid of the rank's latest start, as it logged it (`rank R/N: node K (HOST), ..., pid P`)."""
    log = run_dir / "logs" / f"rank{rank}.log"
    pids = re.findall(rf"rank {rank}/\d+: node \d+ \(\S+\), local rank \d+/\d+, pid (\d+)", log.read_text()) \
        if log.exists() else []
    return int(pids[-1]) if pids else 0


def records(run_dir: Path) -> list[dict]:
    return read_records(run_dir)[0]


def strike(run_dir: Path, rank: int, sig: int) -> tuple[int, float]:
    """Once the job has a checkpoint and a few steps past it, send sig to the rank; (pid, when)."""
    wait_until(lambda: checkpoint_steps(run_dir) and len(metrics(run_dir)) >= CKPT + 3 and rank_pid(run_dir, rank),
               150, f"{run_dir.name}: step {CKPT + 3}", 0.05)
    pid = rank_pid(run_dir, rank)
    os.kill(pid, sig)
    t = time.time()
    assert checkpoint_steps(run_dir)[-1] < STEPS, "the job ended before the failure"
    return pid, t


def finish(s: dict, job: int, timeout: float = 180) -> None:
    state = wait_job(job, timeout, env=ENV)
    assert state == "COMPLETED", f"job {job} {state}\n{job_output(s, job)}"


def check_one_in_job_restart(run_dir: Path, job: int, cause: str | set, excluded: list[str], world: list[int]) -> dict:
    recs = records(run_dir)
    starts = [r for r in recs if r["event"] == "start"]
    restarts = [r for r in recs if r["event"] == "in_job_restart"]
    assert [r["slurm"]["job_id"] for r in starts] == [str(job)] * 2, starts
    assert [r["slurm"]["in_job_restart"] for r in starts] == [0, 1]
    assert [r["world_size"] for r in starts] == world
    assert not [r for r in recs if r["event"].startswith("requeue")]
    assert controller_fields(job)["Restarts"] == "0"  # Slurm never requeued it
    causes = cause if isinstance(cause, set) else {cause}
    assert len(restarts) == 1 and restarts[0]["cause"] in causes and restarts[0]["excluded"] == excluded, restarts
    return restarts[0]


def report(run_dir: Path) -> tuple[dict, str]:
    from hpcllm.report.report import build_report, format_report

    rep = build_report(run_dir, use_sacct=False)
    return rep, format_report(rep)


def test_hung_rank_named_by_the_watchdog_restarts_in_the_job_on_the_node_left(root):
    s = spec(root, "hung", nodes=2)
    run_dir = Path(s["run_dir"])
    job = submit(root, s)
    ref = reference(root, s)
    pid = 0
    try:
        pid, t_fail = strike(run_dir, 1, signal.SIGSTOP)  # rank 1 runs on n2
        finish(s, job)
    finally:
        run(["scancel", str(job)], env=ENV)
        if pid:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
    _, err = ref.communicate(timeout=240)
    assert ref.returncode == 0, err[-2000:]
    rec = check_one_in_job_restart(run_dir, job, "hung", ["n2"], [2, 1])
    assert "rank(s) 1 did not arrive" in rec["why"] and rec["nodes"] == ["n1"] and rec["world_size"] == 1
    got, want = metrics(run_dir), metrics(Path(s["run_dir"] + "-ref"))
    assert [m["step"] for m in got] == [m["step"] for m in want] == list(range(1, STEPS + 1))
    for g, w in zip(got, want):
        assert abs(g["loss"] - w["loss"]) <= RTOL * abs(w["loss"]), (g["step"], g["loss"], w["loss"])
    rep, text = report(run_dir)
    assert rep["in_job_restarts"] == 1 and rep["requeues"] == 0
    second = rep["starts"][1]
    assert second["resumed_from_step"] % CKPT == 0 and 0 < second["resumed_from_step"] < STEPS
    assert second["recovery_s"] > 0
    assert "in-job restart 1 (no requeue, same allocation): hung, excluded n2" in text, text
    assert "restarted in the job (hung:" in text and "recovery " in text
    _timing("hung", t_fail, second)


def submitit_output(s: dict, job: int) -> str:
    logs = Path(s["run_dir"]) / "submitit" / str(job)
    return "\n".join(p.read_text() for p in sorted(logs.glob(f"{job}_0_log.*")))


def test_killed_rank_is_replaced_by_the_spare_node_bitwise(root):
    s = spec(root, "spare", nodes=1, spare=1, global_batch=2)
    run_dir = Path(s["run_dir"])
    p = subprocess.run([sys.executable, "-m", "hpcllm.cli", "submit", str(write_spec(root, s))], capture_output=True,
                       text=True, cwd=REPO, env=ENV, timeout=120)
    assert p.returncode == 0, p.stderr
    job = int(re.findall(r"as (\d+)", p.stdout)[0])
    ref = reference(root, s)
    try:
        _, t_fail = strike(run_dir, 0, signal.SIGKILL)  # the one training rank, on n1
        state = wait_job(job, 180, env=ENV)
        assert state == "COMPLETED", f"job {job} {state}\n{submitit_output(s, job)[-3000:]}"
    finally:
        run(["scancel", str(job)], env=ENV)
    _, err = ref.communicate(timeout=240)
    assert ref.returncode == 0, err[-2000:]
    rec = check_one_in_job_restart(run_dir, job, "killed", ["n1"], [1, 1])
    assert rec["spares_taken"] == ["n2"] and rec["nodes"] == ["n2"], rec
    starts = [r for r in records(run_dir) if r["event"] == "start"]
    assert [r["slurm"]["step_nodelist"] for r in starts] == ["n1", "n2"]
    a, b = weights(run_dir, STEPS), weights(Path(s["run_dir"] + "-ref"), STEPS)
    assert all(torch.equal(a[k], b[k]) for k in a)
    got, want = metrics(run_dir), metrics(Path(s["run_dir"] + "-ref"))
    assert [m["loss"] for m in got] == [m["loss"] for m in want]
    rep, text = report(run_dir)
    assert rep["in_job_restarts"] == 1 and "spare n2 taken" in text, text
    out = submitit_output(s, job)
    assert "in-job restart 1 of 2: a rank on n1 died: Killed; excluding n1, spare(s) n2 taken" in out, out[-3000:]
    _timing("spare", t_fail, rep["starts"][1])


def _timing(name: str, t_fail: float, row: dict) -> None:
    """The recovery of this run in parts, for docs/performance.md (printed with pytest -s)."""
    ij = row["in_job_restart"]
    print(f"\n[{name}] failure -> first new step {row['began'] + row['startup_s'] - t_fail:.1f} s; report: recovery "
          f"{row['recovery_s']:.1f} s = detection {ij['detect_s']:.1f} + teardown {ij['teardown_s']:.1f} + decision "
          f"{ij['decide_s']:.1f} + relaunch {ij['relaunch_s']:.1f} + set-up/load {ij['load_s']:.1f}")


def test_a_node_set_down_is_left_out_and_the_job_goes_on_on_the_other(root):
    """A node lost as Slurm sees it (set DOWN: what slurmctld does when a node stops answering): the
    job keeps its allocation (--no-kill) and its step runs again on n1 alone."""
    s = spec(root, "down", nodes=2)
    run_dir = Path(s["run_dir"])
    job = submit(root, s)
    down = False
    try:
        wait_until(lambda: checkpoint_steps(run_dir) and len(metrics(run_dir)) >= CKPT + 3, 150, "step 23", 0.05)
        t_fail = time.time()
        assert run(["scontrol", "update", "nodename=n2", "state=down", "reason=hpcllm-test"], env=ENV).returncode == 0
        down = True
        assert checkpoint_steps(run_dir)[-1] < STEPS, "the job ended before the failure"
        finish(s, job)
    finally:
        run(["scancel", str(job)], env=ENV)
        if down:  # give the shared test cluster its node back
            run(["scontrol", "update", "nodename=n2", "state=resume"], env=ENV)
            wait_until(lambda: "down" not in run(["sinfo", "-h", "-n", "n2", "-o", "%T"], env=ENV).stdout, 60,
                       "n2 back up")
    rec = check_one_in_job_restart(run_dir, job, "lost", ["n2"], [2, 1])
    # slurmctld takes the node out of the job at once; its state may already read IDLE again when
    # recover asks (the local node's slurmd re-registers: ReturnToService=2)
    assert rec["why"].startswith("node(s) lost: n2 ") and rec["nodes"] == ["n1"], rec
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, STEPS + 1))
    rep, _ = report(run_dir)
    _timing("down", t_fail, rep["starts"][1])


def test_inference_job_that_loses_a_rank_finishes_its_shards_on_the_node_left(root):
    """An inference job (dynamic schedule, 2 nodes x 1 task) whose rank on n2 is killed goes on on n1
    with the shards left: its outputs are one process's, every shard once."""
    from tests.infer.helpers import model_and_prompts, outputs

    lines = [{"id": 700 + i, "prompt": "x = " * (1 + i % 5) + str(i)} for i in range(16)]
    model_and_prompts(root, lines, cli=None, per_shard=1)
    infer = {"model": str(root / "model"), "prompts": str(root / "prompts"), "max_new_tokens": 16,
             "temperature": 0.9, "top_k": 20, "seed": 4, "batch_size": 1, "schedule": "dynamic"}
    s = {"kind": "infer", "name": "infer-lost", "run_dir": str(root / "infer-lost"), "infer": infer,
         "dist": {"timeout_s": 6}, "slurm": {"nodes": 2, "tasks_per_node": 1, "time": "00:10:00"}}
    run_dir = Path(s["run_dir"])
    job = submit(root, s)
    ref = subprocess.Popen([sys.executable, "-m", "hpcllm.cli", "infer", str(write_spec(root, {
        "kind": "infer", "name": "infer-one", "run_dir": str(root / "infer-one"), "infer": infer}))], cwd=REPO,
        env=local_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        done = lambda: len(list((run_dir / "outputs").glob("*.done"))) if (run_dir / "outputs").is_dir() else 0
        wait_until(lambda: done() >= 2 and rank_pid(run_dir, 1), 150, "2 shards done", 0.05)
        os.kill(rank_pid(run_dir, 1), signal.SIGKILL)
        assert done() < len(lines), "the job ended before the failure"
        finish(s, job)
    finally:
        run(["scancel", str(job)], env=ENV)
    _, err = ref.communicate(timeout=240)
    assert ref.returncode == 0, err[-2000:]
    # the watchdog of rank 0 may name the dead rank before srun's teardown ends the step: either way n2 goes
    rec = check_one_in_job_restart(run_dir, job, {"killed", "hung"}, ["n2"], [2, 1])
    assert rec["nodes"] == ["n1"]
    want = outputs(root / "infer-one")
    assert sorted(want) == [700 + i for i in range(16)]
    assert outputs(run_dir) == want
