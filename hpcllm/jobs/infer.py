"""The `infer` job: batched generation or scoring over prompt shards (hpcllm.infer.job); split over
a Slurm job array when slurm.array_tasks > 1."""

from __future__ import annotations

from pathlib import Path

from hpcllm.errors import InferError
from hpcllm.jobs.kind import JobKind


def run(spec, force: bool = False) -> int:
    from hpcllm.infer.job import run_infer
    from hpcllm.jobs.lock import release_run_dirs
    from hpcllm.jobs.runtime import record_start, start

    comm = start(spec)
    record = record_start(spec, comm, **(start_fields(spec) if comm.rank == 0 else {}))
    from hpcllm import monitor

    mon = monitor.start(spec, comm)  # live Prometheus metrics, when the spec's metrics section asks
    # no `finally: comm.close()`: closing waits for the peers (a barrier on some backends), so on an
    # error it would keep this rank from reaching the CLI, which reports the error and ends every rank
    try:
        summary = run_infer(spec, comm, force=force, start_id=record.id)  # the markers name their start
    except BaseException as e:  # the error still goes up to the CLI; the record says how the start ended
        record.end("crashed", gather=False, reason=f"{type(e).__name__}: {e}"[:500])
        mon.close("crashed")
        raise
    record.end("finished", summary=summary, **(end_fields(spec) if comm.rank == 0 else {}))
    mon.close("finished")
    comm.close()
    release_run_dirs()
    return 0


def start_fields(spec) -> dict:
    """What an inference start records beyond the common fields (hpcllm.jobs.runtime.record_start)."""
    from hpcllm.jobs.runtime import manifest_sha256

    return dict(dataset_manifest_sha256=manifest_sha256(spec.infer.prompts), model=str(spec.infer.model),
                array=[spec.infer.array_task, spec.infer.array_tasks])


def end_fields(spec) -> dict:
    """The model's hash, as the shards' done markers record it (hashing the weights again would
    cost what loading them did)."""
    import json

    for marker in sorted((Path(spec.run_dir) / "outputs").glob("out-*.h5.done")):
        try:
            return {"model_sha256": json.loads(marker.read_text())["fingerprint"]["model_sha256"]}
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return {}


def array_tasks(spec) -> int:
    if spec.slurm.array_tasks <= 1:
        return 1
    from hpcllm.data.prompts import open_prompt_dataset
    from hpcllm.data.shards import MANIFEST

    if not (Path(spec.infer.prompts) / MANIFEST).is_file():
        return spec.slurm.array_tasks  # written by an earlier job of the chain: its shard count is not known yet
    return max(1, min(spec.slurm.array_tasks, len(open_prompt_dataset(spec.infer.prompts).shards)))


def array_task_overrides(task: int, tasks: int) -> list[str]:
    # task i does the shards s with s % tasks == i (hpcllm.infer.config.array_slot)
    return [f"infer.array_task={task}", f"infer.array_tasks={tasks}"]


def run_dir_share(spec) -> tuple[int, int]:
    """The tasks of a job array share the run_dir's outputs, each its own shards: each holds its task's
    lock (hpcllm.jobs.lock); a plain job holds the whole run_dir."""
    from hpcllm.infer.job import array_slot

    return array_slot(spec.infer)


def incomplete(spec) -> str | None:
    """Every shard of this job (of this array task) has its output and `.done` marker; a whole job
    also has its output manifest."""
    from hpcllm.data.prompts import open_prompt_dataset
    from hpcllm.infer.config import array_slot
    from hpcllm.infer.outputs import marked_done

    out_dir = Path(spec.run_dir) / "outputs"
    shards = open_prompt_dataset(spec.infer.prompts).shards
    task, tasks = array_slot(spec.infer)
    # the markers, not a recomputed fingerprint (that would load the model): each done shard's marker
    # is for its input and its output has the recorded size, and all were made by one configuration
    markers = {i: marked_done(out_dir, s) for i, s in enumerate(shards) if i % tasks == task}
    missing = [shards[i].path.name for i, m in markers.items() if m is None]
    if len({repr(m["fingerprint"]) for m in markers.values() if m is not None}) > 1:
        return f"outputs in {out_dir} were made by different configurations"
    if missing:
        return (f"{len(missing)} prompt shard(s) without output in {out_dir} (first: {missing[0]})"
                + (f" [array task {task} of {tasks}]" if tasks > 1 else ""))
    if tasks == 1 and not (out_dir / "manifest.json").is_file():
        return f"no output manifest {out_dir / 'manifest.json'}"
    return None


KIND = JobKind(name="infer", help="batched generation/scoring over prompt shards; or `infer export RUN_DIR --jsonl F`",
               inputs=lambda spec: [("infer.prompts", spec.infer.prompts), ("infer.model", spec.infer.model)],
               run=run, incomplete=incomplete, outputs=lambda spec: [("run_dir", str(Path(spec.run_dir) / "outputs"))],
               array_tasks=array_tasks, array_task_overrides=array_task_overrides, run_dir_error=InferError,
               holds_run_dir=run_dir_share, restarts_in_job=True)
