"""What a job kind is (JobKind), and the kind of a name (get_kind). The names are hpcllm.jobs's
registry; each kind is the KIND of its module hpcllm/jobs/<name>.py, imported on first use (so that
`hpcllm config`, `render` and `submit --dry-run` stay free of torch).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from hpcllm.errors import ConfigError
from hpcllm.jobs import MODULES

if TYPE_CHECKING:
    from hpcllm.config import JobSpec


def _no_paths(spec: "JobSpec") -> list[tuple[str, str]]:
    return []


@dataclass(frozen=True)
class JobKind:
    name: str
    help: str
    # (key, path) pairs this job reads: they must exist on every node (preflight) and at submit time,
    # unless an earlier job of a `--chain` writes them (see `outputs`)
    inputs: Callable[["JobSpec"], list[tuple[str, str]]]
    # on every rank: join the other ranks, do the work, return the exit status
    run: Callable[["JobSpec"], int]
    # after the step has ended with status 0: why the job's work is not complete, or None when it is.
    # srun's status alone proves nothing (a step that failed to launch exits 0), so a job is complete
    # only when its results say so
    incomplete: Callable[["JobSpec"], str | None]
    # (key, path) pairs this job writes that another job may read: a later job of a chain may name
    # such a path (or one below it) as an input before it exists
    outputs: Callable[["JobSpec"], list[tuple[str, str]]] = _no_paths
    # a run that stopped on a signal or the time limit exits EXIT_REQUEUE and is requeued
    requeue: bool = False
    # a step that lost a node or a rank runs again inside the allocation (hpcllm.launch.recover):
    # the job resumes its work on whatever ranks are left
    restarts_in_job: bool = False
    # how many array tasks the job is split into at submit time (1: a plain job)
    array_tasks: Callable[["JobSpec"], int] = lambda spec: 1
    # the overrides that make a spec task i of n of its job array (only for kinds with array_tasks)
    array_task_overrides: Callable[[int, int], list[str]] = lambda i, n: []
    # further checks before anything is submitted (raise ConfigError)
    check: Callable[["JobSpec"], None] = lambda spec: None
    # the error (and so the exit code) of a run_dir that cannot be written
    run_dir_error: type = ConfigError
    # the share of its run_dir the job holds for its lifetime (hpcllm.jobs.lock: one job per
    # run_dir), as (task, tasks) — (0, 1) is the whole of it; None: it takes no lock
    holds_run_dir: Callable[["JobSpec"], tuple[int, int]] | None = None

    @property
    def template(self) -> str:
        return f"{self.name}.sbatch.j2"


def get_kind(name: str) -> JobKind:
    if name not in MODULES:
        raise ConfigError(f"unknown job kind {name!r} (one of {', '.join(MODULES)})")
    return importlib.import_module(MODULES[name]).KIND
