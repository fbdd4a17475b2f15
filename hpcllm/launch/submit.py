"""`hpcllm submit SPEC... [key=value ...] [--chain] [--dry-run]`: submit job specs to Slurm through submitit.

Nothing is submitted until every spec has passed every check: the spec itself, the values that
reach the batch script (hpcllm.launch.script), the inputs — which must exist, unless an earlier job
of the `--chain` writes them (JobKind.outputs) — a run_dir that can be created, and Slurm's own
verdict (`sbatch --test-only`: partitions, GPUs, node and CPU counts, features). A refusal is one
line and exit 2; no run_dir is created for a job that was not submitted, and if sbatch still fails
half-way through a chain, the jobs already submitted by this command are cancelled.

Each job runs `hpcllm KIND SPEC_FILE` in every task (`JobRunner`, in the task's process: the same
code path and the same one-line errors as the rendered scripts), SPEC_FILE being the resolved spec
written to RUN_DIR/submitit/. Submitit's script then ends, like the rendered ones, with
hpcllm.launch.finish: the job ends COMPLETED only if its work is done, and a training job that
checkpointed on the time-limit signal is requeued there (up to slurm.max_requeues).

`--chain` makes each job start after the previous one succeeded (`afterok`; a job whose dependency
can never be met is cancelled by Slurm: `--kill-on-invalid-dep=yes`). An inference spec with
slurm.array_tasks > 1 becomes a job array, split into several arrays above the cluster's
MaxArraySize; with slurm.array_parallelism each array starts after the previous one ended, so the
limit holds for the whole job. Submitting from inside a job drops the inherited SLURM_* variables.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hpcllm.config import JobSpec, dump_spec, load_spec
from hpcllm.errors import ConfigError, HpcllmError
from hpcllm.jobs.kind import JobKind, get_kind
from hpcllm.launch.config import time_seconds
from hpcllm.launch.finish import controller_state  # noqa: F401  (tests and callers ask it from here)
from hpcllm.launch.script import SRUN_PASSING_SIGNALS, check_script_values, job_name, restart_lines

PREVIOUS = "<previous job id>"  # what a dry run shows for ids not known yet


def minutes(slurm_time: str) -> int:
    return math.ceil(time_seconds(slurm_time) / 60)


@dataclass
class Planned:
    """One spec of the command line, checked and ready to submit."""

    path: str
    spec: JobSpec
    kind: JobKind
    tasks: int  # array tasks (1: a plain job)
    job_ids: list[str] = field(default_factory=list)

    @property
    def python(self) -> str:
        return self.spec.slurm.python or sys.executable

    @property
    def spec_file(self) -> Path:
        """Where the resolved spec goes: named by its content, so that submitting the spec again with
        other overrides never changes what an already queued job will run."""
        digest = hashlib.sha256(dump_spec(self.spec).encode()).hexdigest()[:12]
        return Path(self.spec.run_dir) / "submitit" / f"{self.kind.name}-spec-{digest}.yaml"

    @property
    def folder(self) -> Path:
        return Path(self.spec.run_dir) / "submitit" / "%j"


# ------------------------------------------------------------------------------------ checks


def _produced_by(path: str, earlier: list[Planned]) -> str | None:
    p = Path(path)
    for e in earlier:
        for key, out in e.kind.outputs(e.spec):
            if out and (p == Path(out) or Path(out) in p.parents):
                return f"{e.path} ({key})"
    return None


def _check_inputs(pl: Planned, earlier: list[Planned], chain: bool) -> None:
    for key, path in pl.kind.inputs(pl.spec):
        if not path:
            raise ConfigError(f"{pl.path}: {key} is not set")
        if Path(path).exists() or (chain and _produced_by(path, earlier)):
            continue
        hint = ("no earlier job of the chain writes it" if chain else
                "without --chain the jobs run independently: if an earlier spec writes it, add --chain")
        raise ConfigError(f"{pl.path}: {key} '{path}' does not exist ({hint})")


def _check_run_dir(pl: Planned) -> None:
    """The run_dir can be created and written — checked without creating it."""
    p = Path(pl.spec.run_dir)
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"{pl.path}: run_dir {pl.spec.run_dir!r} cannot be created or written ({p} is not a "
                          "writable directory): choose another run_dir")


def _check_shared_run_dir(pl: Planned, earlier: list[Planned], overrides: list[str]) -> None:
    """Two specs of one submission on one run_dir would hold the same checkpoints, logs and lock (and
    the second would be refused when it starts): overrides apply to every spec, so a `run_dir=` given
    with several specs is the usual way there."""
    for other in earlier:
        if Path(other.spec.run_dir).resolve() == Path(pl.spec.run_dir).resolve():
            cause = (" (the override run_dir=... applies to every spec of the command: give each spec its "
                     "own run_dir in its file)" if any(o.split("=", 1)[0] == "run_dir" for o in overrides) else "")
            raise ConfigError(f"{other.path} and {pl.path} both have run_dir {pl.spec.run_dir!r}{cause}: each job "
                              "needs its own run_dir")


def plan(spec_paths: list[str], overrides: list[str], chain: bool) -> list[Planned]:
    """Load and check every spec; raise ConfigError (one line) before anything is submitted."""
    planned: list[Planned] = []
    for path in spec_paths:
        spec = load_spec(path, overrides)
        check_script_values(spec)
        kind = get_kind(spec.kind)
        kind.check(spec)
        pl = Planned(path, spec, kind, tasks=1)
        _check_shared_run_dir(pl, planned, overrides)
        _check_inputs(pl, planned, chain)
        _check_run_dir(pl)
        try:
            pl.tasks = kind.array_tasks(spec)
        except HpcllmError as e:
            raise ConfigError(f"{path}: {e}") from None
        planned.append(pl)
    return planned


# ------------------------------------------------------------------------------------ scripts


def max_array_size() -> int:
    """The cluster's MaxArraySize (array indices must stay below it); Slurm's default if unknown."""
    from hpcllm.launch.jobs import slurm_config

    size = slurm_config(_submit_env()).get("MaxArraySize", "")
    return int(size) if size.isdigit() else 1001


def array_chunks(tasks: int, max_array: int) -> list[range]:
    """Task ranges, one per job array: indices of an array stay below MaxArraySize."""
    size = max(1, max_array)
    return [range(start, min(tasks, start + size)) for start in range(0, tasks, size)] if tasks > 1 else [range(0, 1)]


def finish_lines(pl: Planned, chunk: range) -> list[str]:
    """submitit's teardown: the step's status goes to hpcllm.launch.finish, whose status is the job's."""
    cmd = f"exec {shlex.quote(pl.python)} -m hpcllm.launch.finish {shlex.quote(str(pl.spec_file))} \"$hpcllm_status\""
    if pl.tasks > 1:  # task i of the chunk is task chunk.start + i of the whole job
        cmd += f' --array-task "$(({chunk.start} + ${{SLURM_ARRAY_TASK_ID:-0}}))" --array-tasks {pl.tasks}'
    return ["hpcllm_status=$?  # the status of the step (srun): this must stay the first line after it", cmd]


def slurm_parameters(pl: Planned, chunk: range, dependency: str | None) -> dict:
    """The SlurmExecutor parameters of one job (one array of a split job)."""
    s = pl.spec.slurm
    extra: dict = {"kill_on_invalid_dep": "yes"}
    for opt in s.extra:
        key, _, value = opt[2:].partition("=")
        extra[key.replace("-", "_")] = value or True
    restart = restart_lines(pl.spec, pl.python, str(pl.spec_file))
    if restart:  # in-job restarts: Slurm keeps the allocation when a node fails
        extra["no_kill"] = True
    if dependency:  # the chain's (and the split array's), after any of the spec's own
        extra["dependency"] = ",".join(d for d in (extra.get("dependency"), dependency) if d)
    params = dict(job_name=job_name(pl.spec), time=minutes(s.time), nodes=s.allocated_nodes(), ntasks_per_node=s.tasks_per_node,
                  cpus_per_task=s.cpus_per_task, srun_args=list(s.srun_args), signal_delay_s=s.warning_signal_s(),
                  setup=[*s.setup, "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}", *restart,
                         *SRUN_PASSING_SIGNALS],
                  teardown=finish_lines(pl, chunk), additional_parameters=extra)
    if len(chunk) > 1:
        params["array_parallelism"] = min(s.array_parallelism or len(chunk), len(chunk))
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if getattr(s, key):
            params[key] = getattr(s, key)
    if s.exclusive:
        params["exclusive"] = True
    return params


def script_text(pl: Planned, chunk: range, dependency: str | None) -> str:
    """The sbatch script submitit writes for this job (what --dry-run prints and --test-only checks)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = slurm_parameters(pl, chunk, dependency)
    command = f"{shlex.quote(pl.python)} -u -m submitit.core._submit {shlex.quote(str(pl.folder))}"
    return _make_sbatch_string(command=command, folder=pl.folder, map_count=len(chunk) if len(chunk) > 1 else None,
                               **params)


def dependencies(pl: Planned, after: list[str] | None, ids: list[str]) -> str | None:
    """The dependency of the next array of `pl`: afterok on the previous job of the chain, and — when
    array_parallelism limits the job — afterany on the previous array, so no two arrays run at once."""
    deps = [f"afterok:{':'.join(after)}"] if after else []
    if ids and pl.spec.slurm.array_parallelism:
        deps.append(f"afterany:{ids[-1]}")
    return ",".join(deps) or None


# ------------------------------------------------------------------------------------ Slurm


def _submit_env() -> dict:
    """This environment without the SLURM_* (etc.) of a job we may run in; SLURM_CONF kept."""
    drop = ("SLURM_", "SLURMD_", "SRUN_", "SBATCH_", "SUBMITIT_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    if "SLURM_CONF" in os.environ:
        env["SLURM_CONF"] = os.environ["SLURM_CONF"]
    return env


def _partition_hint(partition: str) -> str:
    """What sinfo says about the partition (or the default one), for an error message."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P|%D|%c|%G|%m|%l"], capture_output=True, text=True, timeout=30,
                             env=_submit_env()).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    for line in out.splitlines():
        name, nodes, cpus, gres, mem, limit = (line.split("|") + [""] * 6)[:6]
        if name.rstrip("*") == partition or (not partition and name.endswith("*")):
            return (f" [sinfo: partition {name.rstrip('*')}: {nodes} node(s), {cpus} CPUs and {mem} MB each, GRES "
                    f"{'none' if gres in ('(null)', '') else gres}, time limit {limit}]")
    names = ", ".join(line.split("|")[0].rstrip("*") for line in out.splitlines())
    return f" [sinfo: partitions {names}]" if names else ""


def slurm_check(pl: Planned) -> None:
    """Slurm's own verdict on the job (`sbatch --test-only`): what only Slurm knows — partitions,
    GPUs (GRES), node and CPU counts, features — without submitting anything."""
    script = script_text(pl, array_chunks(pl.tasks, max_array_size())[0], None)
    try:
        p = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=60,
                           env=_submit_env())
    except FileNotFoundError:
        raise ConfigError("sbatch not found: `hpcllm submit` runs where Slurm's commands do (or use hpcllm render)") from None
    except subprocess.TimeoutExpired:
        raise ConfigError("sbatch --test-only did not answer within 60 s: is slurmctld up?") from None
    if p.returncode != 0:
        why = "; ".join(line.replace("sbatch: error: ", "").strip() for line in p.stderr.splitlines() if line.strip())
        raise ConfigError(f"{pl.path}: Slurm refuses the job: {why or f'sbatch --test-only exited {p.returncode}'}"
                          f"{_partition_hint(pl.spec.slurm.partition)}")


def _cancel(job_ids: list[str]) -> None:
    if job_ids:
        try:
            subprocess.run(["scancel", *job_ids], capture_output=True, timeout=60, env=_submit_env())
        except (OSError, subprocess.TimeoutExpired) as e:
            print(f"hpcllm submit: scancel {' '.join(job_ids)} failed ({e}): cancel them by hand", file=sys.stderr)


# ------------------------------------------------------------------------------------ submission


class JobRunner:
    """What runs in every Slurm task of a submitted job: `hpcllm KIND SPEC_FILE [overrides]`, in this
    process — the same code, exit codes and one-line errors as a rendered script's `srun hpcllm ...`."""

    def __init__(self, kind: str, spec_file: str, overrides: list[str] = ()):
        self.kind, self.spec_file, self.overrides = kind, str(spec_file), list(overrides)

    def __call__(self):
        import signal

        from hpcllm.cli import main

        # submitit's handlers requeue the job on USR2 and ignore SIGTERM; hpcllm decides itself, as
        # in the rendered scripts: a kind that requeues remembers a stop signal from the very start,
        # the others keep working through submitit's (always requested) time-limit warning
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGCONT, signal.SIG_DFL)
        if get_kind(self.kind).requeue:
            from hpcllm.train.signals import catch_early_signals

            catch_early_signals()
        else:
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        code = main([self.kind, self.spec_file, *self.overrides])
        if code != 0:  # SystemExit is no Exception: submitit neither pickles it nor prints a traceback
            raise SystemExit(code)
        return {"kind": self.kind, "spec": self.spec_file}


def _first_lines(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    errors = [line.replace("sbatch: error: ", "") for line in lines if "error" in line]
    return "; ".join(errors or lines[-1:]) or type(e).__name__


def _submit_one(pl: Planned, after: list[str] | None, max_array: int) -> None:
    """Submit the job (its arrays, when split); each id goes into pl.job_ids as soon as it exists."""
    import submitit

    ex = submitit.SlurmExecutor(folder=str(pl.folder), max_num_timeout=pl.spec.slurm.max_requeues,
                                python=shlex.quote(pl.python))
    for chunk in array_chunks(pl.tasks, max_array):
        ex.update_parameters(**slurm_parameters(pl, chunk, dependencies(pl, after, pl.job_ids)))
        runners = [JobRunner(pl.kind.name, pl.spec_file, pl.kind.array_task_overrides(i, pl.tasks) if pl.tasks > 1 else [])
                   for i in chunk]
        with ex.batch():
            jobs = [ex.submit(r) for r in runners]
        pl.job_ids.append(jobs[0].job_id.split("_")[0])  # array tasks are ID_i


def submit(spec_paths: list[str], overrides: list[str], dry_run: bool = False, chain: bool = False,
           max_array: int | None = None) -> list[str]:
    planned = plan(spec_paths, overrides, chain)
    if dry_run:
        _dry_run(planned, chain, max_array)
        return []
    for pl in planned:
        slurm_check(pl)
    max_array = max_array or max_array_size()
    from hpcllm.atomic import write_text
    from hpcllm.launch.jobs import cluster_name, record_submission

    cluster = cluster_name(_submit_env())  # `hpcllm jobs` lists the jobs of the cluster it is pointed at

    submitted: list[str] = []
    previous: list[str] | None = None
    for pl in planned:
        run_dir = Path(pl.spec.run_dir)
        created = not run_dir.exists()
        try:
            pl.spec_file.parent.mkdir(parents=True, exist_ok=True)
            write_text(pl.spec_file, dump_spec(pl.spec))
            errors = io.StringIO()  # submitit prints sbatch's complaints itself: they go into our one line
            with contextlib.redirect_stderr(errors), submitit_clean_env():
                _submit_one(pl, previous if chain else None, max_array)
            for jid, chunk in zip(pl.job_ids, array_chunks(pl.tasks, max_array)):
                record_submission(pl.spec.run_dir, jid, pl.kind.name, pl.spec.name, len(chunk), cluster)
        except BaseException as e:  # sbatch refused after all (limits changed, slurmctld down), Ctrl-C, ...
            _cancel(submitted + pl.job_ids)  # nothing half-submitted
            if created and not pl.job_ids:
                shutil.rmtree(run_dir, ignore_errors=True)
            if isinstance(e, KeyboardInterrupt):
                raise
            done = submitted + pl.job_ids
            undone = f"cancelled the jobs it had submitted ({', '.join(done)})" if done else "nothing submitted"
            raise ConfigError(f"{pl.path}: submission failed: {_first_lines(e)} ({undone})") from None
        submitted += pl.job_ids
        tasks = f" ({pl.tasks} array tasks)" if pl.tasks > 1 else ""
        after = f" (after {':'.join(previous)})" if chain and previous else ""
        print(f"submitted {pl.kind.name} job '{pl.spec.name}' as {', '.join(pl.job_ids)}{tasks}{after}: "
              f"logs in {Path(pl.spec.run_dir) / 'submitit'}")
        previous = pl.job_ids
    return submitted


@contextlib.contextmanager
def submitit_clean_env():
    """submitit.helpers.clean_env, keeping SLURM_CONF (where the cluster's configuration is)."""
    import submitit

    conf = os.environ.get("SLURM_CONF")
    with submitit.helpers.clean_env():
        if conf:
            os.environ["SLURM_CONF"] = conf
        yield


def _dry_run(planned: list[Planned], chain: bool, max_array: int | None) -> None:
    checked = shutil.which("sbatch") is not None
    if checked:
        for pl in planned:
            slurm_check(pl)
    max_array = max_array or (max_array_size() if checked else 1001)
    previous = False
    for pl in planned:
        print(f"# ---- {pl.path}: would submit (dry run, nothing submitted) ----")
        chunks = array_chunks(pl.tasks, max_array)
        ids: list[str] = []
        for chunk in chunks:
            print(script_text(pl, chunk, dependencies(pl, [PREVIOUS] if chain and previous else None, ids)))
            ids.append("<previous array job id>")
        print(f"# ---- resolved spec (written to {pl.spec_file}) ----")
        print(dump_spec(pl.spec))
        previous = True
    print("# Slurm's own checks (sbatch --test-only) passed" if checked else
          "# sbatch not found: Slurm's own checks (sbatch --test-only) were skipped")


def main(args) -> int:
    if args.chain and len([a for a in args.specs if "=" not in a]) < 2:
        raise ConfigError("--chain needs at least two job specs")
    specs = [a for a in args.specs if "=" not in a]
    overrides = [a for a in args.specs if "=" in a]
    if not specs:
        raise ConfigError("no job spec given")
    submit(specs, overrides, args.dry_run, args.chain)
    return 0


__all__ = ["submit", "plan", "JobRunner", "script_text", "minutes", "controller_state"]
