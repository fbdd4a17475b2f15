"""`hpcllm jobs [RUN_DIR|JOB...]` and `hpcllm logs JOB [--rank N]`: what was submitted, its state and
why (one `sacct` and one `squeue` call per listing; `--watch` polls no faster than every 10 s), and
each rank's output.

Where the states come from: `sacct -D` (accounting) lists every instance of a job — a requeued job
once per start — so a job's ELAPSED is the sum over its starts and RESTARTS their count less one;
slurmctld (`squeue`) is more current for the jobs it still holds, and its reasons are exact. A
cluster without accounting has only slurmctld, which forgets a job MinJobAge after it ended: the
listing says so once, and shows what slurmctld still has.

Each submission records the cluster it went to (ClusterName); a listing shows the jobs of the
cluster SLURM_CONF points at, and counts the others. An array task has two ids — ARRAY_TASK
(`120_3`, the one listed) and its own job id (SLURM_JOB_ID) — and both name it here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from hpcllm.errors import EXIT_CODES, HpcllmError
from hpcllm.launch.config import time_seconds

RECORD = "jobs.jsonl"
MIN_POLL_S = 10.0
JOB_ID = re.compile(r"^\d+(_\d+)?$")


def slurm_config(env: dict | None = None) -> dict[str, str]:
    """`scontrol show config` as {key: value}; {} when it cannot be asked."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30,
                             env=env).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, sep, v in (line.partition("=") for line in out.splitlines()) if sep}


def cluster_name(env: dict | None = None) -> str | None:
    return slurm_config(env).get("ClusterName") or None


def record_submission(run_dir: str | Path, job_id: str, kind: str, name: str, tasks: int,
                      cluster: str | None = None) -> None:
    from hpcllm.paths import open_append

    with open_append(Path(run_dir) / RECORD) as f:  # never through a link planted in the run dir
        f.write(json.dumps({"job_id": job_id, "kind": kind, "name": name, "array_tasks": tasks, "cluster": cluster,
                            "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


def _records(run_dirs: list[str]) -> list[dict]:
    dirs = [Path(d) for d in run_dirs] or sorted(p.parent for p in Path("runs").glob(f"*/{RECORD}"))
    out = []
    for d in dirs:
        f = d / RECORD
        if f.exists():
            out += [dict(json.loads(line), run_dir=str(d)) for line in f.read_text().splitlines() if line.strip()]
    return out


@dataclass(frozen=True)
class JobState:
    label: str  # Slurm's name of the job: 123, or 120_3 for task 3 of array 120 (pending tasks: 120_[3-9])
    raw: str  # its own job id (an array task's SLURM_JOB_ID)
    state: str
    elapsed_s: int | None  # over all its starts (sacct -D); slurmctld alone knows the current start's
    restarts: int | None  # how often it was requeued (None: unknown)
    exit: str  # status:signal
    reason: str


def _ids(job_ids: list[str]) -> str:
    return ",".join(dict.fromkeys(job_ids))


def sacct_states(job_ids: list[str]) -> tuple[dict[str, JobState], str | None]:
    """({label: state}, None) from accounting, or ({}, why not): sacct's own error line."""
    if not job_ids:
        return {}, None
    try:
        p = subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-j", _ids(job_ids), "-o",
                            "JobID,JobIDRaw,State,ElapsedRaw,ExitCode,Reason"], capture_output=True, text=True,
                           timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {}, f"sacct: {e}"
    if p.returncode != 0:
        return {}, f"sacct: {(p.stderr.strip().splitlines() or [f'exit {p.returncode}'])[-1]}"
    out: dict[str, JobState] = {}
    for line in p.stdout.splitlines():  # the instances of a job in order: the last is the current one
        label, raw, state, elapsed, code, reason = (line.split("|") + [""] * 6)[:6]
        before = out.get(label)
        out[label] = JobState(label, raw, state.split()[0] if state else "", (before.elapsed_s if before else 0)
                              + (int(elapsed) if elapsed.isdigit() else 0), before.restarts + 1 if before else 0,
                              code, reason)
    return out, None


def _exit(wait_status: str) -> str:
    """squeue's exit_code (a wait status) as sacct writes it: status:signal."""
    return f"{int(wait_status) >> 8}:{int(wait_status) & 0x7F}" if wait_status.isdigit() else ""


def controller_states(job_ids: list[str]) -> tuple[dict[str, JobState], str | None]:
    """The jobs slurmctld still holds (more current than sacct, and its reasons are exact: sacct says
    `Dependency` where slurmctld says `DependencyNeverSatisfied`), or ({}, why not)."""
    if not job_ids:
        return {}, None
    fields = "JobArrayID,JobID,State,Reason,TimeUsed,exit_code,RestartCnt"
    try:
        p = subprocess.run(["squeue", "-h", "-t", "all", "-j", _ids(job_ids), "-O",
                            ",".join(f"{f}:|" for f in fields.split(","))], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {}, f"squeue: {e}"
    if p.returncode != 0:
        err = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        return {}, None if "Invalid job id" in err else f"squeue: {err}"  # (it knows none of them)
    out = {}
    for line in p.stdout.splitlines():
        label, raw, state, reason, used, code, restarts = (line.split("|") + [""] * 7)[:7]
        try:
            elapsed = time_seconds(used)
        except ValueError:
            elapsed = None
        out[label] = JobState(label, raw, state, elapsed, int(restarts) if restarts.isdigit() else 0, _exit(code),
                              reason)
    return out, None


def job_states(job_ids: list[str]) -> tuple[dict[str, JobState], str | None]:
    """{label: state} of the jobs and what the listing lacks (None: nothing): accounting's states,
    updated by slurmctld's for the jobs it still holds; slurmctld's alone without accounting."""
    acct, no_acct = sacct_states(job_ids)
    held, no_ctl = controller_states(job_ids)
    if no_acct and no_ctl:
        raise HpcllmError(f"neither accounting nor slurmctld answers ({no_acct}; {no_ctl}): is SLURM_CONF set?")
    states = dict(acct)
    for label, h in held.items():
        a = acct.get(label)
        states[label] = h if a is None else replace(a, state=h.state, exit=h.exit or a.exit, reason=h.reason,
                                                    restarts=max(a.restarts or 0, h.restarts or 0))
    note = None
    if no_acct:
        note = (f"no accounting ({no_acct}): states are slurmctld's, which forgets a job MinJobAge after it ends "
                "(then UNKNOWN here: finished jobs need accounting), and ELAPSED is the current start's only")
    return states, note


def _hms(seconds: int | None) -> str:
    if seconds is None:
        return ""
    d, rest = divmod(seconds, 86400)
    return (f"{d}-" if d else "") + f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"


def why(state: str, exit_code: str, reason: str) -> str:
    """One short reason for the listing: Slurm's (pending, cancelled) or what an exit code means."""
    if reason == "DependencyNeverSatisfied":
        return "DependencyNeverSatisfied: a job it depends on failed" + (" (never starts: scancel it)"
                                                                             if state == "PENDING" else "")
    status = exit_code.split(":")[0]
    if state in ("FAILED", "REQUEUED") and status.isdigit() and int(status) in EXIT_CODES:
        return f"exit {status}: {EXIT_CODES[int(status)]}"
    return "" if reason in ("None", "NonZeroExitCode") else reason


def _of_record(rec: dict, states: dict[str, JobState]) -> list[JobState]:
    mine = [s for label, s in states.items() if label == rec["job_id"] or label.startswith(rec["job_id"] + "_")]
    unknown = JobState(rec["job_id"], rec["job_id"], "UNKNOWN", None, None, "", "")
    return sorted(mine, key=lambda s: s.label) or [unknown]


def _named(s: JobState, names: list[str]) -> bool:
    return not names or any(n in (s.label, s.raw) or (s.label.split("_")[0] == n) for n in names)


def _split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """(run dirs, job ids): an argument that is a job id (123, 120_3) and no directory names a job."""
    jobs = [a for a in args if JOB_ID.match(a) and not Path(a).is_dir()]
    return [a for a in args if a not in jobs], jobs


def list_jobs(args: list[str], watch: float = 0.0) -> int:
    run_dirs, names = _split_args(args)
    said = False
    while True:
        recs = _records(run_dirs)
        if not recs:
            print("no submitted jobs found (hpcllm submit records them in RUN_DIR/jobs.jsonl)")
            return 0
        here = cluster_name()
        elsewhere = Counter(r["cluster"] for r in recs if here and r.get("cluster") not in (None, here))
        recs = [r for r in recs if not here or r.get("cluster") in (None, here)]
        states, note = job_states([r["job_id"] for r in recs])
        print(f"{'JOBID':<14} {'KIND':<8} {'NAME':<24} {'STATE':<12} {'ELAPSED':<10} {'RESTARTS':<8} {'EXIT':<6} "
              f"{'RUN_DIR':<32} REASON")
        for r in recs:
            for s in _of_record(r, states):
                if _named(s, names):
                    restarts = "" if s.restarts is None else s.restarts
                    print(f"{s.label:<14} {r['kind']:<8} {r['name'][:24]:<24} {s.state:<12} {_hms(s.elapsed_s):<10} "
                          f"{restarts:<8} {s.exit:<6} {r['run_dir']:<32} {why(s.state, s.exit, s.reason)}".rstrip())
                    if watch and s.state == "RUNNING":  # its live rate and ETA, from the files it writes
                        from hpcllm.monitor.progress import watch_line

                        print(f"{'':<14} {watch_line(r['run_dir'], r['kind']) or 'no progress recorded yet'}")
        notes = [f"{n} job{'s' * (n > 1)} of cluster {c} not shown" for c, n in sorted(elsewhere.items())]
        if notes:
            notes = [f"{', '.join(notes)} (this is cluster {here}: SLURM_CONF picks the cluster)"]
        if note and not said:  # once, not on every refresh
            notes.append(note)
            said = True
        for line in notes:
            print(f"hpcllm jobs: {line}", file=sys.stderr)
        if not watch:
            return 0
        time.sleep(max(MIN_POLL_S, watch))  # never hammer slurmctld/slurmdbd
        print()


def _task_of(job: str) -> str | None:
    """ARRAY_TASK of an array task named by its own job id, from Slurm; None if not one, or unknown."""
    try:
        states, _ = job_states([job])
    except HpcllmError:
        return None
    return next((s.label for s in states.values() if s.raw == job and "_" in s.label), None)


def show_logs(job: str, rank: int, err: bool, run_dirs: list[str]) -> int:
    recs = {r["job_id"]: r for r in _records(run_dirs)}
    rec = recs.get(job.split("_")[0])
    if rec is not None and "_" not in job and rec.get("array_tasks", 1) > 1:
        raise HpcllmError(f"job {job} is a job array of {rec['array_tasks']} tasks: name one, {job}_0 to "
                          f"{job}_{rec['array_tasks'] - 1}")
    if rec is None and JOB_ID.match(job) and "_" not in job:  # an array task's own id?
        job = _task_of(job) or job
        rec = recs.get(job.split("_")[0])
    if rec is None:
        raise HpcllmError(f"job {job}: not found in any RUN_DIR/{RECORD} (pass the run dir: hpcllm logs JOB RUN_DIR)")
    path = Path(rec["run_dir"]) / "submitit" / job / f"{job}_{rank}_log.{'err' if err else 'out'}"
    if not path.exists():
        raise HpcllmError(f"{path}: no such log (not started yet, or rank {rank} does not exist)")
    print(path.read_text(), end="")
    return 0
