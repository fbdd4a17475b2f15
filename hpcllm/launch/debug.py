"""`hpcllm debug SPEC [--run]`: the commands that reproduce a job interactively — same resources,
same setup lines, same srun options — and, with --run, run them (salloc + srun --pty)."""

from __future__ import annotations

import shlex
import subprocess
import sys

from hpcllm.config import JobSpec


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


def commands(spec: JobSpec, spec_path: str) -> list[str]:
    s = spec.slurm
    alloc = salloc_args(spec)
    py = s.python or sys.executable
    job = [py, "-m", "hpcllm.cli", spec.kind, spec_path]
    q = shlex.join
    return [
        "# 1. get an allocation like the job's (a shell on the login node, inside the allocation):",
        q(alloc),
        "# 2. in that shell: the site setup lines of the job",
        *s.setup,
        "# 3a. the whole job, all ranks, with collective tracing:",
        "HPCLLM_LOG_LEVEL=debug " + q(["srun", *s.srun_args, *job]),
        "# 3b. one rank under pdb (a 1-rank world: the same code path, no peers to wait for):",
        q(["srun", *s.srun_args, "--ntasks=1", "--pty", py, "-m", "pdb", "-m", "hpcllm.cli", spec.kind, spec_path]),
        "# 3c. per-rank logs of a running or finished job:",
        f"tail -f {shlex.quote(spec.run_dir)}/logs/rank*.log",
    ]


def run(spec: JobSpec, spec_path: str) -> int:
    """salloc with the job's resources, then the whole job under srun inside it."""
    s = spec.slurm
    inner = shlex.join(["srun", *s.srun_args, s.python or sys.executable, "-m", "hpcllm.cli", spec.kind, spec_path])
    return subprocess.call([*salloc_args(spec), "bash", "-c", "\n".join([*s.setup, inner])])
