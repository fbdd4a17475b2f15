"""A requeued job runs the same <job>.<step> ids again, so whatever a step left behind on its node is
in the way of the restarted step. Slurm 22.05's mpi/pmix plugin binds <spool>/stepd.slurm.pmix.<job>.<step>
first and unlinks it only when the step ends normally: after a failed PMIx setup or a dead slurmstepd
the socket stays, and every later start of that job failed "Address already in use" (with srun exiting 0).
The local cluster's Prolog/Epilog (slurm/local/start.sh) removes a job's PMIx files on its nodes."""

import os
import signal
import sys
from pathlib import Path

import pytest

from tests.slurm_util import BASE, quote, require_slurm, run, sbatch, slurm_env, wait_job, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.mpi, pytest.mark.slow]

# a 2-rank MPI task that says it is up, then waits to be ended; it leaves when its slurmstepd dies
TASK = """
import os, signal, sys, time
if os.environ.get("IGNORE_TERM") == "1":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # ended by SIGKILL after KillWait instead
from mpi4py import MPI
c = MPI.COMM_WORLD
print("up", c.rank, c.size, os.environ["SLURM_RESTART_COUNT"] if "SLURM_RESTART_COUNT" in os.environ else 0, flush=True)
parent = os.getppid()
for _ in range(1200):
    if os.getppid() != parent:
        os._exit(1)
    time.sleep(0.5)
"""


def stepd_pids(job: int, step: int) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and (p / "cmdline").read_bytes().startswith(f"slurmstepd: [{job}.{step}]".encode()):
                pids.append(int(p.name))
        except OSError:
            pass
    return pids


def test_every_start_of_a_requeued_job_launches_its_step(tmp_path):
    """Four requeues of a job whose 2-task srun step runs under PMIx; every restart must start the step:
    after a start whose PMIx setup failed, after a start whose slurmstepd was killed, after requeues
    whose tasks were ended by SIGKILL after KillWait and by SIGTERM."""
    require_slurm()
    env = slurm_env()
    (tmp_path / "task.py").write_text(TASK)
    out = tmp_path / "out.txt"
    script = f"""#!/bin/bash
#SBATCH --job-name=hpcllm-test-requeue-steps
#SBATCH --ntasks=2
#SBATCH --time=00:05:00
#SBATCH --output={out}
#SBATCH --open-mode=append
#SBATCH --requeue
r=${{SLURM_RESTART_COUNT:-0}}
echo "start $r"
# start 0: PMIx setup fails after the plugin bound its socket (its client directory cannot be made)
[ "$r" = 0 ] && export SLURM_PMIX_TMPDIR={quote(str(tmp_path / "missing"))}
[ "$r" = 2 ] && export IGNORE_TERM=1
# srun in the background, as hpcllm's own scripts run it: a requeue sends TERM to this shell and
# srun, and a shell with srun in the foreground dies at once. The orphaned srun then escapes
# proctrack/linuxproc, and after a start whose slurmstepd was killed it waits KillWait+2 s for the
# dead step, then kills <job>.0 again: by then the next start's step 0, which it ended.
srun --mpi=pmix {quote(sys.executable, str(tmp_path / "task.py"))} &
step=$!
trap "kill -TERM $step 2>/dev/null" TERM
wait $step; status=$?
while kill -0 $step 2>/dev/null; do wait $step; status=$?; done
echo "srun exit $status (start $r)"
"""
    job = sbatch(script, tmp_path, env=env)
    text = lambda: out.read_text() if out.exists() else ""  # noqa: E731
    up = lambda r: sorted(x for x in text().splitlines() if x.startswith("up ") and x.endswith(f" {r}"))  # noqa: E731
    try:
        wait_until(lambda: "(start 0)" in text(), 60, f"job {job}: first start")
        assert up(0) == [], text()  # the injected failure did happen: no task of start 0 ran
        for r in range(1, 5):
            assert run(["scontrol", "requeue", str(job)], env=env).returncode == 0
            wait_until(lambda: len(up(r)) == 2 or f"(start {r})" in text(), 90, f"job {job}: start {r}")
            assert up(r) == [f"up 0 2 {r}", f"up 1 2 {r}"], f"start {r} did not launch its step:\n{text()}"
            if r == 1:  # a slurmstepd that dies leaves its PMIx socket, directories and step socket
                pids = stepd_pids(job, 0)
                assert len(pids) == 1, pids
                os.kill(pids[0], signal.SIGKILL)
    finally:
        run(["scancel", str(job)], env=env)
    assert wait_job(job, 60, env=env) == "CANCELLED"
    # the Epilog cleaned up after the last start too
    wait_until(lambda: not list((BASE / "spool").glob(f"*pmix.{job}.*")), 30, f"job {job}: PMIx files removed")
