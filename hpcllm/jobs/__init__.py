"""Job kinds: one home each for what `prepare`, `train` and `infer` mean as jobs.

A kind says which job-spec keys it reads as inputs (checked by the preflight and before submit)
and which paths it writes (so that a chain may read what an earlier job of it writes), which sbatch
template renders it, how its work is split over a job array, whether a stopped run is requeued,
what runs on every rank, and when its work is complete. The CLI, `hpcllm render`, `hpcllm submit`,
`hpcllm debug` and the batch script's last word (hpcllm.launch.finish) ask this registry and never
name a kind themselves; adding a kind is one module and one line here.

    kind = get_kind(spec.kind)
    code = kind.run(spec)           # on every rank: join the others, do the work, leave
    why = kind.incomplete(spec)     # after the step, in the batch script: None when the work is done
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, get_args

from hpcllm.errors import ConfigError

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


# The one list of job kinds: the type of a job spec's `kind` (hpcllm.config.JobSpec), so that the spec
# loader checks it like any other typed key (a mistyped kind gets its "did you mean"). Each kind is
# the module hpcllm.jobs.<kind>, defining KIND, imported on first use: `hpcllm config` stays free of torch.
KindName = Literal["prepare", "train", "infer"]

_MODULES = {name: f"hpcllm.jobs.{name}" for name in get_args(KindName)}


def kind_names() -> tuple[str, ...]:
    return tuple(_MODULES)


def get_kind(name: str) -> JobKind:
    if name not in _MODULES:
        raise ConfigError(f"unknown job kind {name!r} (one of {', '.join(_MODULES)})")
    return importlib.import_module(_MODULES[name]).KIND
