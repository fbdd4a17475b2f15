"""The `infer` job: batched generation or scoring over prompt shards (hpcllm.infer.job); split over
a Slurm job array when slurm.array_tasks > 1."""

from __future__ import annotations

from hpcllm.errors import InferError
from hpcllm.jobs import JobKind


def run(spec, force: bool = False) -> int:
    from hpcllm.infer.job import run_infer
    from hpcllm.jobs.runtime import start

    comm = start(spec)
    # no `finally: comm.close()`: closing waits for the peers (a barrier on some backends), so on an
    # error it would keep this rank from reaching the CLI, which reports the error and ends every rank
    run_infer(spec, comm, force=force)
    comm.close()
    return 0


def array_tasks(spec) -> int:
    if spec.slurm.array_tasks <= 1:
        return 1
    from hpcllm.data.prompts import open_prompt_dataset

    return max(1, min(spec.slurm.array_tasks, len(open_prompt_dataset(spec.infer.prompts).shards)))


KIND = JobKind(name="infer", help="batched generation/scoring over prompt shards; or `infer export RUN_DIR --jsonl F`",
               inputs=lambda spec: [("infer.prompts", spec.infer.prompts), ("infer.model", spec.infer.model)],
               run=run, array_tasks=array_tasks, run_dir_error=InferError)
