"""`hpcllm debug SPEC [key=value ...] [--run]`: the commands that reproduce a job interactively — same
resources, same setup lines, same srun options, same overrides — and, with --run, run them (salloc +
srun). Every value is checked by hpcllm.launch.script.check_script_values, as for render and submit."""

from __future__ import annotations

import shlex
import subprocess
import sys

from hpcllm.config import JobSpec
from hpcllm.errors import IncompleteError
from hpcllm.jobs.kind import get_kind
from hpcllm.launch.finish import meaning
from hpcllm.launch.script import check_script_values


def salloc_args(spec: JobSpec) -> list[str]:
    s = spec.slurm
    alloc = ["salloc", f"--nodes={s.nodes}", f"--ntasks-per-node={s.tasks_per_node}",
             f"--cpus-per-task={s.cpus_per_task}", f"--time={s.time}"]
    if s.gpus_per_node:
        alloc.append(f"--gpus-per-node={s.gpus_per_node}")
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if getattr(s, key):
            alloc.append(f"--{key}={getattr(s, key)}")
    return alloc


def _job(spec: JobSpec, spec_path: str, overrides: list[str], *python_args: str) -> list[str]:
    return [spec.slurm.python or sys.executable, *python_args, "-m", "hpcllm.cli", spec.kind, spec_path, *overrides]


def commands(spec: JobSpec, spec_path: str, overrides: list[str] = ()) -> list[str]:
    check_script_values(spec, spec_path, overrides)
    s, q, overrides = spec.slurm, shlex.join, list(overrides)
    return [
        "# 1. get an allocation like the job's (a shell on the login node, inside the allocation):",
        q(salloc_args(spec)),
        "# 2. in that shell: the site setup lines of the job",
        *s.setup,
        "# 3a. the whole job, all ranks, with collective tracing:",
        "HPCLLM_LOG_LEVEL=debug " + q(["srun", *s.srun_args, *_job(spec, spec_path, overrides)]),
        "# 3b. one rank under pdb (a 1-rank world: the same code path, no peers to wait for):",
        q(["srun", *s.srun_args, "--ntasks=1", "--pty", *_job(spec, spec_path, overrides, "-m", "pdb")]),
        "# 3c. per-rank logs of a running or finished job:",
        f"tail -f {shlex.quote(spec.run_dir)}/logs/rank*.log",
    ]


def run(spec: JobSpec, spec_path: str, overrides: list[str] = ()) -> int:
    """salloc with the job's resources, then the whole job under srun inside it. A step that exits 0
    counts only if the job's work is done (srun exits 0 when its step fails to launch)."""
    check_script_values(spec, spec_path, overrides)
    s = spec.slurm
    inner = shlex.join(["srun", *s.srun_args, *_job(spec, spec_path, list(overrides))])
    code = subprocess.call([*salloc_args(spec), "bash", "-c", "\n".join([*s.setup, inner])])
    if code != 0:
        print(f"hpcllm debug: the job's step exited with status {code} ({meaning(code)})", file=sys.stderr)
        return code
    why = get_kind(spec.kind).incomplete(spec)
    if why:
        raise IncompleteError(f"the step exited 0 but the job did not finish: {why}")
    return 0
