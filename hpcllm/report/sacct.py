"""The allocations Slurm accounted for a run's jobs, from sacct, when the cluster keeps accounting.

Every start records its SLURM_JOB_ID; `sacct -D` lists each instance of a job — a requeued job
appears once per start — with the wall time it held its nodes. That is the allocation as the
cluster bills it: the prolog and launch before the processes, and after their end record their exit
and the job's last step, all of which the records miss (docs/monitoring.md: a few seconds a start).
When Slurm requeues the job itself, the instance ends at the requeue while the ranks run on briefly.
"""

from __future__ import annotations

import subprocess
from datetime import datetime

FIELDS = ("JobIDRaw", "JobID", "State", "Start", "End", "ElapsedRaw", "NNodes", "NCPUS")


def _timestamp(value: str) -> float | None:
    try:
        return datetime.fromisoformat(value).timestamp()  # sacct prints the cluster's local time
    except ValueError:
        return None  # "Unknown" (still running), "None" (never started)


def allocations(job_ids: list[str], timeout: float = 30) -> tuple[list[dict] | None, str | None]:
    """([one row per job instance], None), or (None, why not) when sacct is missing, fails or the
    cluster keeps no accounting."""
    if not job_ids:
        return None, "no Slurm job ids in the records"
    cmd = ["sacct", "-j", ",".join(sorted(set(job_ids), key=str)), "-D", "-X", "-n", "-P", "-o", ",".join(FIELDS)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return None, "sacct not found"
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"sacct failed ({e})"
    if p.returncode != 0:
        return None, f"sacct failed: {(p.stderr.strip().splitlines() or ['exit %d' % p.returncode])[-1]}"
    rows = []
    for line in p.stdout.splitlines():
        values = line.split("|")
        if len(values) != len(FIELDS):
            continue
        r = dict(zip(FIELDS, values))
        rows.append(dict(job=r["JobIDRaw"], label=r["JobID"], state=r["State"].split()[0] if r["State"] else "",
                         start=_timestamp(r["Start"]), end=_timestamp(r["End"]),
                         elapsed_s=float(r["ElapsedRaw"]) if r["ElapsedRaw"].isdigit() else None,
                         nodes=int(r["NNodes"]) if r["NNodes"].isdigit() else None,
                         cpus=int(r["NCPUS"]) if r["NCPUS"].isdigit() else None))
    if not rows:
        return None, "sacct knows none of the run's jobs (no accounting on this cluster?)"
    return rows, None
