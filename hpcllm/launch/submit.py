"""`hpcllm submit SPEC... [--dry-run] [--chain]`: submit job specs to Slurm through submitit.

The job spec's `slurm` section becomes a submitit executor; the submitted callable (`JobRunner`)
runs the job in every task — rank from Slurm, MPI through `srun --mpi=pmix`. A training job that
checkpoints on the time-limit signal (exit 85) requeues itself (up to slurm.max_requeues) and the
next start resumes from the checkpoint. `--chain` makes each job depend on the previous one
(`afterok`). Submitting from inside a job drops the inherited SLURM_* variables (SLURM_CONF kept).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

from hpcllm.config import JobSpec, from_dict, load_spec, to_dict
from hpcllm.errors import EXIT_REQUEUE, ConfigError
from hpcllm.jobs import get_kind
from hpcllm.launch.config import time_seconds
from hpcllm.launch.script import job_name


def minutes(slurm_time: str) -> int:
    return math.ceil(time_seconds(slurm_time) / 60)


def executor_for(spec: JobSpec, dependency: str | None = None):
    import submitit

    s = spec.slurm
    ex = submitit.AutoExecutor(folder=str(Path(spec.run_dir) / "submitit" / "%j"), cluster="slurm",
                               slurm_max_num_timeout=s.max_requeues)
    extra = {}
    for opt in s.extra:
        key, _, value = opt[2:].partition("=")
        extra[key.replace("-", "_")] = value or True
    if dependency:
        extra["dependency"] = dependency
    params = dict(name=job_name(spec), timeout_min=minutes(s.time), nodes=s.nodes, tasks_per_node=s.tasks_per_node,
                  cpus_per_task=s.cpus_per_task, slurm_setup=list(s.setup), slurm_srun_args=list(s.srun_args),
                  slurm_signal_delay_s=s.warning_signal_s(), slurm_additional_parameters=extra)
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if getattr(s, key):
            params[f"slurm_{key}"] = getattr(s, key)
    if s.exclusive:
        params["slurm_exclusive"] = True
    ex.update_parameters(**params)
    return ex


def max_array_size() -> int:
    """The cluster's MaxArraySize (array indices must stay below it); Slurm's default if unknown."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 1001
    for line in out.splitlines():
        if line.split("=")[0].strip() == "MaxArraySize":
            return int(line.split("=", 1)[1])
    return 1001


class JobRunner:
    """What runs in every Slurm task: the job of the (resolved) spec."""

    def __init__(self, spec: JobSpec, array_task: int = 0, array_tasks: int = 0):
        self.spec_dict = to_dict(spec)
        if array_tasks > 1:
            self.spec_dict["infer"].update(array_task=array_task, array_tasks=array_tasks)

    def __call__(self):
        spec = from_dict(JobSpec, self.spec_dict, source="<submitted spec>")
        # one thread per allocated CPU, as the rendered sbatch scripts do (submitit exports nothing)
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus and "OMP_NUM_THREADS" not in os.environ:
            import torch

            os.environ["OMP_NUM_THREADS"] = cpus
            torch.set_num_threads(int(cpus))
        kind = get_kind(spec.kind)
        code = kind.run(spec)
        if code == EXIT_REQUEUE and kind.requeue:
            self._requeue(spec)
        elif code != 0:
            raise SystemExit(code)
        return {"kind": spec.kind, "run_dir": spec.run_dir}

    def _requeue(self, spec: JobSpec) -> None:
        job, restarts = os.environ.get("SLURM_JOB_ID"), int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if job is None or restarts >= spec.slurm.max_requeues:
            # a plain message and the trainer's status, not a traceback through submitit
            print(f"hpcllm: checkpointed and stopped; not requeued (restart {restarts}, max_requeues "
                  f"{spec.slurm.max_requeues}): submit again to continue from the checkpoint in {spec.run_dir}",
                  file=sys.stderr, flush=True)
            raise SystemExit(EXIT_REQUEUE)
        # A stop asked for while the job runs (the time-limit signal, scancel --signal) is ours to requeue.
        # If Slurm is already ending the job (scancel, scontrol requeue, time limit, preemption: all send
        # SIGTERM), its own decision stands: a cancel must stay a cancel. Only rank 0 asks slurmctld
        # (one query per job, not one per rank); the other ranks wait for Slurm to end them either way.
        if os.environ.get("SLURM_PROCID", "0") == "0":
            state = controller_state(job)
            if state not in (None, "RUNNING"):
                print(f"hpcllm: job {job} is {state} (Slurm is ending it): checkpointed, not requeueing", flush=True)
                return
            print(f"hpcllm: checkpointed, requeueing job {job} (restart {restarts})", flush=True)
            p = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if p.returncode != 0:  # e.g. `scontrol requeue` by someone else is what stopped us
                print(f"hpcllm: scontrol requeue {job}: {p.stderr.strip()} (already being requeued?)", flush=True)
        time.sleep(300)  # Slurm ends this task when it requeues the job
        print(f"hpcllm: job {job} was not requeued within 300 s", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_REQUEUE)


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


def _submit_array(ex, spec: JobSpec, n: int) -> list:
    """An inference job as job arrays: task i does shards i, i+n, ... (finished shards are skipped,
    so retrying a failed task is safe). Arrays longer than the cluster's MaxArraySize are split."""
    ex.update_parameters(slurm_array_parallelism=spec.slurm.array_parallelism or n)
    chunk = max(1, max_array_size() - 1)
    jobs = []
    for start in range(0, n, chunk):
        with ex.batch():
            part = [ex.submit(JobRunner(spec, i, n)) for i in range(start, min(n, start + chunk))]
        jobs += part
    return jobs


def submit(spec_paths: list[str], overrides: list[str], dry_run: bool = False, chain: bool = False) -> list[str]:
    import submitit

    specs = [load_spec(p, overrides) for p in spec_paths]
    ids: list[str] = []
    previous = None
    for path, spec in zip(spec_paths, specs):
        dep = f"afterok:{previous}" if chain and previous else None
        ex = executor_for(spec, dep)
        if dry_run:
            inner = ex._executor
            text = inner._make_submission_file_text(inner._submitit_command_str, uid="dry-run")
            print(f"# ---- {path}: would submit (dry run, nothing submitted) ----")
            print(text)
            print("# ---- resolved spec ----")
            from hpcllm.config import dump_spec

            print(dump_spec(spec))
            previous = "<previous job id>"
            continue
        Path(spec.run_dir).mkdir(parents=True, exist_ok=True)
        conf = os.environ.get("SLURM_CONF")
        with submitit.helpers.clean_env():  # drops SLURM_*: a job submitted from a job must not inherit them
            if conf:  # ... except where the cluster's configuration is
                os.environ["SLURM_CONF"] = conf
            n_tasks = get_kind(spec.kind).array_tasks(spec)
            if n_tasks > 1:
                jobs = _submit_array(ex, spec, n_tasks)
            else:
                jobs = [ex.submit(JobRunner(spec))]
        job_ids = sorted({j.job_id.split("_")[0] for j in jobs}, key=int)  # array tasks are ID_i
        ids += job_ids
        from hpcllm.launch.jobs import record_submission

        for jid in job_ids:
            record_submission(spec.run_dir, jid, spec.kind, spec.name, len(jobs))
        print(f"submitted {spec.kind} job '{spec.name}' as {', '.join(job_ids)}"
              f"{f' ({len(jobs)} array tasks)' if len(jobs) > 1 else ''}{f' (after {previous})' if dep else ''}: "
              f"logs in {Path(spec.run_dir) / 'submitit'}")
        previous = ":".join(job_ids)
    return ids


def main(args) -> int:
    if args.chain and len(args.specs) < 2:
        raise ConfigError("--chain needs at least two job specs")
    specs = [a for a in args.specs if "=" not in a]
    overrides = [a for a in args.specs if "=" in a]
    if not specs:
        raise ConfigError("no job spec given")
    submit(specs, overrides, args.dry_run, args.chain)
    return 0


__all__ = ["submit", "JobRunner", "executor_for", "minutes"]
