"""The batch script's last word: the job's exit status, decided once its step (srun) has ended.

Both ways onto Slurm end with it — the rendered scripts (slurm/templates/base.sbatch.j2) and `hpcllm
submit` (a teardown line of submitit's script):

    python -m hpcllm.launch.finish SPEC_FILE STATUS [--array-task I --array-tasks N]

srun's status alone proves nothing: Slurm 22.05's srun exits 0 when the step is aborted before it
has completely launched ("task 0 launch failed: Unspecified error"), and a job whose script ends
with that srun ends COMPLETED 0:0 with no work done. So:

  status 85 and a kind that requeues   the ranks checkpointed on a stop request: requeue the job here,
                                       once, while Slurm still has it RUNNING and max_requeues allows
  any other non-zero status            the job fails with that status
  0                                    the job is complete only if its results say so
                                       (JobKind.incomplete: for training, the checkpoint of
                                       max_steps); otherwise it fails with 9 (IncompleteError)

Everything but a complete job or a requeue is one line on stderr and a non-zero exit: a job can end
COMPLETED only through here.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from hpcllm.errors import EXIT_CODES, EXIT_REQUEUE, HpcllmError, IncompleteError


def controller_state(job: str, env: dict | None = None) -> str | None:
    """The job's state as slurmctld has it now (sacct lags behind), or None if it can't be asked."""
    try:
        p = subprocess.run(["scontrol", "show", "job", "-o", str(job)], capture_output=True, text=True, timeout=30,
                           env=env)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for tok in p.stdout.split():
        if tok.startswith("JobState="):
            return tok.split("=", 1)[1]
    return None


def meaning(status: int) -> str:
    if status in EXIT_CODES:
        return EXIT_CODES[status]
    if status > 128:
        try:
            return f"a rank was killed by {signal.Signals(status - 128).name}"
        except ValueError:
            pass
    return "not an hpcllm exit status: see the srun lines above"


def _requeue(spec, job: str | None, restarts: int) -> tuple[int, str | None]:
    limit = spec.slurm.max_requeues
    # A stop asked for while the job runs (the time-limit signal, scancel --signal) is ours to requeue.
    # If Slurm is already ending the job (scancel, scontrol requeue, time limit, preemption: all send
    # SIGTERM), its own decision stands: a cancel must stay a cancel.
    state = controller_state(job) if job else None
    if state not in (None, "RUNNING"):
        return EXIT_REQUEUE, f"hpcllm: job {job} is {state} (Slurm is ending it): checkpointed, not requeueing"
    again = f"submit again to continue from the checkpoint in {spec.run_dir}"
    if job is None or restarts >= limit:
        return EXIT_REQUEUE, (f"hpcllm: checkpointed and stopped; not requeued (restart {restarts}, max_requeues "
                              f"{limit}): {again}")
    from hpcllm.provenance import append

    # said (and recorded for `hpcllm report`) before asking: a successful requeue ends this batch
    # shell at once, so nothing after `scontrol requeue` is sure to run
    print(f"hpcllm: checkpointed, requeueing job {job} (restart {restarts})", flush=True)
    append(spec.run_dir, {"event": "requeued", "job": job, "restart": restarts, "time": time.time()})
    try:
        p = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        err = p.stderr.strip() if p.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as e:
        err = str(e)
    if err:
        append(spec.run_dir, {"event": "requeue_failed", "job": job, "restart": restarts, "time": time.time()})
        return EXIT_REQUEUE, f"hpcllm: checkpointed, but scontrol requeue {job} failed ({err}): {again}"
    return 0, None


def decide(spec, status: int, job: str | None, restarts: int, label: str | None = None) -> tuple[int, str | None]:
    """(the job's exit status, the line that says why — None when a requeue has printed it already).
    `job`: SLURM_JOB_ID; `label`: how to name it (an array task: ARRAYID_TASK)."""
    from hpcllm.jobs.kind import get_kind

    kind = get_kind(spec.kind)
    what = f"hpcllm: {kind.name} job {label or job or '(not under Slurm)'}"
    if status == EXIT_REQUEUE and kind.requeue:
        return _requeue(spec, job, restarts)
    if status != 0:
        return status, f"{what} failed: its step exited with status {status} ({meaning(status)}); logs in {spec.run_dir}"
    try:
        why = kind.incomplete(spec)
    except HpcllmError as e:
        why = str(e)
    if why:
        return IncompleteError.exit_code, (f"{what} did not finish although its step exited 0: {why} (the step "
                                           "failed to launch or ended early: see the srun lines above)")
    return 0, f"{what}: complete"


def main(argv: list[str] | None = None) -> int:
    from hpcllm.config import load_spec
    from hpcllm.jobs.kind import get_kind

    p = argparse.ArgumentParser(prog="python -m hpcllm.launch.finish", description=__doc__.split("\n")[0])
    p.add_argument("spec")
    p.add_argument("status", type=int, help="the step's exit status (srun's $?)")
    p.add_argument("--array-task", type=int, default=None, help="this job is task I of N of a job array")
    p.add_argument("--array-tasks", type=int, default=0)
    args = p.parse_args(argv)
    job = os.environ.get("SLURM_JOB_ID")
    label = job or "(not under Slurm)"
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        label = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '?')}"
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    try:
        spec = load_spec(args.spec)
        if args.array_task is not None:
            spec = load_spec(args.spec, get_kind(spec.kind).array_task_overrides(args.array_task, args.array_tasks))
        code, line = decide(spec, args.status, job, restarts, label)
    except HpcllmError as e:
        code, line = args.status or e.exit_code, f"hpcllm: job {label}: cannot check how it ended: {e}"
    if line is not None:  # (a requeue has said so already)
        print(line, file=sys.stdout if code == 0 else sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
