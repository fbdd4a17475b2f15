"""Helpers for tests that use the local Slurm test cluster (slurm/local/start.sh; `make test` starts it)."""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

BASE = Path(os.environ.get("HPCLLM_SLURM_BASE", "/tmp/hpcllm-slurm"))
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                "DEADLINE"}


def slurm_env(extra: dict | None = None) -> dict:
    """os.environ pointed at the local cluster, without the SLURM_* of any job we may run inside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["SLURM_CONF"] = str(BASE / "etc" / "slurm.conf")
    env.update(extra or {})
    return env


def slurm_available() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], env=slurm_env(), capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def require_slurm() -> None:
    if not slurm_available():
        pytest.skip(f"local Slurm not running (bash slurm/local/start.sh; conf {BASE}/etc/slurm.conf)")


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=kw.pop("env", slurm_env()), capture_output=True, text=True, timeout=60, **kw)


def sbatch(script: str, cwd: str | os.PathLike, *args: str) -> int:
    """Submit a batch script given as text; returns the job id."""
    p = run(["sbatch", "--parsable", *args], input=script, cwd=cwd)
    assert p.returncode == 0, f"sbatch failed: {p.stderr}"
    return int(p.stdout.strip().split(";")[0])


def sacct_rows(job_id: int | str, fields: str = "JobID,State,ExitCode,NTasks") -> list[dict]:
    p = run(["sacct", "-j", str(job_id), "-n", "-P", "-o", fields])
    names = fields.split(",")
    return [dict(zip(names, line.split("|"))) for line in p.stdout.splitlines() if line.strip()]


def job_state(job_id: int | str) -> str:
    # slurmctld is authoritative while it holds the job (MinJobAge=300); slurmdbd lags behind it by
    # seconds, so a job that is already running can still read PENDING in sacct
    from hpcllm.launch.submit import controller_state

    state = controller_state(str(job_id), env=slurm_env())
    if state is not None:
        return state
    rows = [r for r in sacct_rows(job_id, "JobID,State") if r["JobID"] == str(job_id)]
    if rows:
        return rows[0]["State"].split()[0]  # "CANCELLED by 0" -> CANCELLED
    return "UNKNOWN"


def wait_job(job_id: int | str, timeout_s: float = 120) -> str:
    """Poll (once a second: never hammer slurmctld) until the job reaches a final state."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state in FINAL_STATES:
            # wait for sacct to have the steps too
            for _ in range(10):
                if any(r["JobID"] == str(job_id) and r["State"].split()[0] == state for r in sacct_rows(job_id)):
                    break
                time.sleep(1)
            return state
        time.sleep(1)
    run(["scancel", str(job_id)])
    raise AssertionError(f"job {job_id} not finished after {timeout_s} s (state {job_state(job_id)})")


def quote(*argv: str) -> str:
    return " ".join(shlex.quote(a) for a in argv)
