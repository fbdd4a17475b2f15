"""Helpers for tests that use the local Slurm test clusters (slurm/local/start.sh; `make test` starts both).

Two clusters run side by side: the single-node one (BASE) and the 2-node one (BASE_2NODE: nodes n1, n2,
each with its own hostname, no accounting). A test picks one through SLURM_CONF:

    env = slurm_env(two_node=True)
    job = sbatch(script, tmp_path, env=env)
    assert wait_job(job, 120, env=env) == "COMPLETED"
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import pytest

BASE = Path(os.environ.get("HPCLLM_SLURM_BASE", "/tmp/hpcllm-slurm"))
BASE_2NODE = Path(os.environ.get("HPCLLM_SLURM_BASE_2NODE", "/tmp/hpcllm-slurm-2node"))
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                "DEADLINE"}


def slurm_env(extra: dict | None = None, two_node: bool = False) -> dict:
    """os.environ pointed at a local cluster, without the SLURM_* of any job we may run inside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["SLURM_CONF"] = str((BASE_2NODE if two_node else BASE) / "etc" / "slurm.conf")
    env.update(extra or {})
    return env


def slurm_available(two_node: bool = False) -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], env=slurm_env(two_node=two_node), capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def require_slurm(two_node: bool = False) -> None:
    if not slurm_available(two_node):
        how = "HPCLLM_SLURM_NODES=2 bash slurm/local/start.sh" if two_node else "bash slurm/local/start.sh"
        pytest.skip(f"local Slurm not running ({how}; conf {slurm_env(two_node=two_node)['SLURM_CONF']})")


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=kw.pop("env", None) or slurm_env(), capture_output=True, text=True, timeout=60,
                          **kw)


def sbatch(script: str, cwd: str | os.PathLike, *args: str, env: dict | None = None) -> int:
    """Submit a batch script given as text; returns the job id."""
    p = run(["sbatch", "--parsable", *args], input=script, cwd=cwd, env=env)
    assert p.returncode == 0, f"sbatch failed: {p.stderr}"
    return int(p.stdout.strip().split(";")[0])


@lru_cache(maxsize=None)
def _conf_has_accounting(conf: str) -> bool:
    try:
        lines = Path(conf).read_text().splitlines()
    except OSError:
        return True  # a cluster we did not write: assume the usual
    return not any(line.replace(" ", "") == "AccountingStorageType=accounting_storage/none" for line in lines)


def has_accounting(env: dict | None = None) -> bool:
    """Whether the cluster keeps accounting (sacct); the 2-node cluster does not."""
    return _conf_has_accounting((env or slurm_env())["SLURM_CONF"])


def sacct_rows(job_id: int | str, fields: str = "JobID,State,ExitCode,NTasks", env: dict | None = None) -> list[dict]:
    p = run(["sacct", "-j", str(job_id), "-n", "-P", "-o", fields], env=env)
    names = fields.split(",")
    return [dict(zip(names, line.split("|"))) for line in p.stdout.splitlines() if line.strip()]


def job_state(job_id: int | str, env: dict | None = None) -> str:
    # slurmctld is authoritative while it holds the job (MinJobAge=300); slurmdbd lags behind it by
    # seconds, so a job that is already running can still read PENDING in sacct
    from hpcllm.launch.submit import controller_state

    state = controller_state(str(job_id), env=env or slurm_env())
    if state is not None:
        return state
    if has_accounting(env):
        rows = [r for r in sacct_rows(job_id, "JobID,State", env=env) if r["JobID"] == str(job_id)]
        if rows:
            return rows[0]["State"].split()[0]  # "CANCELLED by 0" -> CANCELLED
    return "UNKNOWN"


def wait_job(job_id: int | str, timeout_s: float = 120, env: dict | None = None) -> str:
    """Poll (once a second: never hammer slurmctld) until the job reaches a final state."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = job_state(job_id, env)
        if state in FINAL_STATES:
            # wait (up to 10 s) for sacct to have the steps too: slurmdbd is usually a fraction of a second behind
            for _ in range(40 if has_accounting(env) else 0):
                if any(r["JobID"] == str(job_id) and r["State"].split()[0] == state
                       for r in sacct_rows(job_id, env=env)):
                    break
                time.sleep(0.25)
            return state
        time.sleep(1)
    run(["scancel", str(job_id)], env=env)
    raise AssertionError(f"job {job_id} not finished after {timeout_s} s (state {job_state(job_id, env)})")


def wait_until(predicate, timeout_s: float, what: str, poll_s: float = 0.5) -> None:
    """Wait (bounded) until predicate() is true; fail naming what did not happen."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout_s} s")
        time.sleep(poll_s)


def quote(*argv: str) -> str:
    return " ".join(shlex.quote(a) for a in argv)


@contextmanager
def mpi_in_background(n: int, argv: list[str], log: Path):
    """Run argv on n ranks (mpirun) while the block runs — an uninterrupted reference run trains while the
    Slurm job under test starts, is signalled and waits out its requeue. Yields the Popen: wait for it
    (proc.wait(timeout)) and check its returncode in the block; it is ended if the block leaves first.
    Its output goes to log (a file, not a pipe that nobody reads meanwhile)."""
    from tests.mpi_util import REPO, mpi_env, mpirun_cmd

    with open(log, "w") as out:
        proc = subprocess.Popen(mpirun_cmd(n, *argv), stdout=out, stderr=subprocess.STDOUT, env=mpi_env(), cwd=REPO)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()  # mpirun passes it on to its ranks
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
