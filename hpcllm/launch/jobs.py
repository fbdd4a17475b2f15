"""`hpcllm jobs [RUN_DIR...]` and `hpcllm logs JOB [--rank N]`: what was submitted, its state and why
(one `sacct` and one `squeue` call per listing; `--watch` polls no faster than every 10 s), and each
rank's output."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from hpcllm.errors import EXIT_CODES, HpcllmError

RECORD = "jobs.jsonl"
MIN_POLL_S = 10.0


def record_submission(run_dir: str | Path, job_id: str, kind: str, name: str, tasks: int) -> None:
    with open(Path(run_dir) / RECORD, "a") as f:
        f.write(json.dumps({"job_id": job_id, "kind": kind, "name": name, "array_tasks": tasks,
                            "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


def _records(run_dirs: list[str]) -> list[dict]:
    dirs = [Path(d) for d in run_dirs] or sorted(p.parent for p in Path("runs").glob(f"*/{RECORD}"))
    out = []
    for d in dirs:
        f = d / RECORD
        if f.exists():
            out += [dict(json.loads(line), run_dir=str(d)) for line in f.read_text().splitlines() if line.strip()]
    return out


def sacct_states(job_ids: list[str]) -> dict[str, dict]:
    if not job_ids:
        return {}
    p = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(job_ids), "-o", "JobID,State,Elapsed,ExitCode,Reason"],
                       capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise HpcllmError(f"sacct failed: {p.stderr.strip()} (is SLURM_CONF set / accounting enabled?)")
    rows = {}
    for line in p.stdout.splitlines():
        jid, state, elapsed, code, reason = (line.split("|") + [""] * 5)[:5]
        rows[jid] = dict(state=state.split()[0], elapsed=elapsed, exit=code, reason=reason)
    return rows


def controller_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """(state, reason) of the jobs slurmctld still holds: more current than sacct, and its reasons are
    exact (sacct says `Dependency` where slurmctld says `DependencyNeverSatisfied`)."""
    if not job_ids:
        return {}
    try:
        p = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i|%T|%r"],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out = {}
    for line in p.stdout.splitlines():
        jid, state, reason = (line.split("|") + ["", ""])[:3]
        out[jid] = (state, reason)
    return out


def why(state: str, exit_code: str, reason: str) -> str:
    """One short reason for the listing: Slurm's (pending, cancelled) or what an exit code means."""
    if reason == "DependencyNeverSatisfied":
        return "DependencyNeverSatisfied: a job it depends on failed" + (" (never starts: scancel it)"
                                                                             if state == "PENDING" else "")
    status = exit_code.split(":")[0]
    if state in ("FAILED", "REQUEUED") and status.isdigit() and int(status) in EXIT_CODES:
        return f"exit {status}: {EXIT_CODES[int(status)]}"
    return "" if reason in ("None", "NonZeroExitCode") else reason


def list_jobs(run_dirs: list[str], watch: float = 0.0) -> int:
    while True:
        recs = _records(run_dirs)
        if not recs:
            print("no submitted jobs found (hpcllm submit records them in RUN_DIR/jobs.jsonl)")
            return 0
        ids = [r["job_id"] for r in recs]
        states, held = sacct_states(ids), controller_states(ids)
        print(f"{'JOBID':<14} {'KIND':<8} {'NAME':<24} {'STATE':<12} {'ELAPSED':<10} {'EXIT':<6} {'RUN_DIR':<32} REASON")
        for r in recs:
            rows = {k: v for k, v in states.items() if k == r["job_id"] or k.startswith(r["job_id"] + "_")}
            if not rows:
                rows = {r["job_id"]: dict(state="UNKNOWN", elapsed="", exit="", reason="")}
            for jid, st in sorted(rows.items()):
                state, reason = held.get(jid, (st["state"], st["reason"]))
                print(f"{jid:<14} {r['kind']:<8} {r['name'][:24]:<24} {state:<12} {st['elapsed']:<10} {st['exit']:<6} "
                      f"{r['run_dir']:<32} {why(state, st['exit'], reason)}".rstrip())
                if watch and state == "RUNNING":  # its live rate and ETA, from the files it writes
                    from hpcllm.monitor.progress import watch_line

                    print(f"{'':<14} {watch_line(r['run_dir'], r['kind']) or 'no progress recorded yet'}")
        if not watch:
            return 0
        time.sleep(max(MIN_POLL_S, watch))  # never hammer slurmctld/slurmdbd
        print()


def show_logs(job: str, rank: int, err: bool, run_dirs: list[str]) -> int:
    base = job.split("_")[0]
    for r in _records(run_dirs):
        if r["job_id"] != base:
            continue
        folder = Path(r["run_dir"]) / "submitit" / job
        path = folder / f"{job}_{rank}_log.{'err' if err else 'out'}"
        if not path.exists():
            raise HpcllmError(f"{path}: no such log (not started yet, or rank {rank} does not exist)")
        print(path.read_text(), end="")
        return 0
    raise HpcllmError(f"job {job}: not found in any RUN_DIR/{RECORD} (pass the run dir: hpcllm logs JOB RUN_DIR)")
