"""`hpcllm jobs` and `hpcllm logs` against the real local clusters, with jobs that never run (held)
or run for a second (an array of `echo`):
- on a cluster without accounting (the 2-node one: sacct says "Slurm accounting storage is
  disabled") the listing comes from slurmctld, and says once that finished jobs need accounting;
- each submission records its cluster; a listing on another cluster hides it and says so, while
  records from before (no cluster) are shown;
- an array task answers to both of its ids (ARRAY_TASK and its own SLURM_JOB_ID); the array's id
  alone asks for a task."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hpcllm.launch.jobs import list_jobs, record_submission, show_logs
from tests.slurm_util import require_slurm, run, slurm_env, wait_job

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]


def hpcllm(*args, two_node=False):
    return subprocess.run([sys.executable, "-m", "hpcllm.cli", *map(str, args)], capture_output=True, text=True,
                          env=slurm_env(two_node=two_node), cwd=REPO, timeout=120)


def rows(stdout: str) -> dict[str, list[str]]:
    lines = stdout.splitlines()
    assert lines and lines[0].split()[:4] == ["JOBID", "KIND", "NAME", "STATE"], stdout
    return {line.split()[0]: line.split() for line in lines[1:] if line.strip() and not line.startswith(" ")}


def test_jobs_without_accounting_and_on_another_cluster(tmp_path):
    require_slurm(two_node=True)
    require_slurm()
    (tmp_path / "in.txt").write_text("some text " * 50)
    spec = tmp_path / "held.yaml"
    spec.write_text(json.dumps({"kind": "prepare", "name": "held", "run_dir": str(tmp_path / "run"),
                                "data": {"inputs": [str(tmp_path / "in.txt")], "dataset": str(tmp_path / "ds")},
                                "slurm": {"time": "00:01:00", "extra": ["--hold"]}}))  # never runs
    p = hpcllm("submit", spec, two_node=True)
    assert p.returncode == 0, p.stderr
    job = re.findall(r"as (\d+)", p.stdout)[0]
    try:
        recs = [json.loads(x) for x in (tmp_path / "run" / "jobs.jsonl").read_text().splitlines()]
        assert [(r["job_id"], r["cluster"]) for r in recs] == [(job, "hpcllm2n")]
        # a record from before clusters were recorded: always shown (here: a job no cluster knows)
        with open(tmp_path / "run" / "jobs.jsonl", "a") as f:
            f.write(json.dumps({"job_id": "999999", "kind": "prepare", "name": "old", "array_tasks": 1}) + "\n")

        assert run(["sacct", "-j", job], env=slurm_env(two_node=True)).stderr.strip() == \
            "Slurm accounting storage is disabled"
        j = hpcllm("jobs", tmp_path / "run", two_node=True)
        assert j.returncode == 0, j.stderr
        r = rows(j.stdout)
        assert r[job][3] == "PENDING" and r[job][-1] == "JobHeldUser", j.stdout
        assert r["999999"][3] == "UNKNOWN", j.stdout
        assert j.stderr.count("\n") == 1 and "Slurm accounting storage is disabled" in j.stderr and \
            "finished jobs" in j.stderr, j.stderr

        # the cluster with accounting: the held job is another cluster's, hidden and counted
        j = hpcllm("jobs", tmp_path / "run")
        assert j.returncode == 0, j.stderr
        assert set(rows(j.stdout)) == {"999999"}, j.stdout
        assert j.stderr == "hpcllm jobs: 1 job of cluster hpcllm2n not shown (this is cluster hpcllm: SLURM_CONF " \
                           "picks the cluster)\n", j.stderr
    finally:
        run(["scancel", job], env=slurm_env(two_node=True))


ECHO = """#!/bin/bash
#SBATCH --array=0-1
#SBATCH -n 1
#SBATCH -t 1
#SBATCH --output=/dev/null
name=${{SLURM_ARRAY_JOB_ID}}_$SLURM_ARRAY_TASK_ID
mkdir {out}/submitit/$name  # where submitit writes a task's logs (Slurm creates no directories)
echo "task $SLURM_ARRAY_TASK_ID is job $SLURM_JOB_ID" > {out}/submitit/$name/${{name}}_0_log.out
"""


def test_an_array_task_answers_to_both_its_ids(tmp_path, monkeypatch, capsys):
    """Files where submitit puts them (RUN_DIR/submitit/A_i/A_i_0_log.out), ids from Slurm."""
    require_slurm()
    run_dir = tmp_path / "run"
    (run_dir / "submitit").mkdir(parents=True)
    p = run(["sbatch", "--parsable"], input=ECHO.format(out=run_dir), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    array = p.stdout.strip()
    record_submission(run_dir, array, "infer", "arr", 2, cluster="hpcllm")
    assert [wait_job(f"{array}_{i}", 60) for i in (0, 1)] == ["COMPLETED"] * 2
    own = {}
    for i in (0, 1):
        text = (run_dir / "submitit" / f"{array}_{i}" / f"{array}_{i}_0_log.out").read_text()
        own[i] = re.fullmatch(rf"task {i} is job (\d+)\n", text).group(1)
    # one task keeps the array's id as its own (Slurm splits the others off): that id names the array
    assert own[0] != array and array in own.values()
    lg = hpcllm("logs", array, run_dir)
    assert lg.returncode == 1 and lg.stderr == (f"hpcllm logs: error: job {array} is a job array of 2 tasks: name "
                                                f"one, {array}_0 to {array}_1\n"), lg.stderr

    monkeypatch.setenv("SLURM_CONF", slurm_env()["SLURM_CONF"])  # the rest in this process: fast
    for i in (0, 1):
        for name in {f"{array}_{i}", own[i]} - {array}:
            assert show_logs(name, 0, False, [str(run_dir)]) == 0
            assert capsys.readouterr().out == f"task {i} is job {own[i]}\n", name
    # the listing names array tasks ARRAY_TASK, and either id picks one
    assert list_jobs([str(run_dir)]) == 0
    assert set(rows(capsys.readouterr().out)) == {f"{array}_0", f"{array}_1"}
    for i in (0, 1):
        for name in {f"{array}_{i}", own[i]} - {array}:
            assert list_jobs([name, str(run_dir)]) == 0
            assert set(rows(capsys.readouterr().out)) == {f"{array}_{i}"}, name
