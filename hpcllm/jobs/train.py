"""The `train` job: data-parallel training (hpcllm.train.trainer), requeued when it stops on a
signal or the time limit, and failed — never reported complete — when it ends short of max_steps."""

from __future__ import annotations

from hpcllm.errors import EXIT_REQUEUE, IncompleteError
from hpcllm.jobs.kind import JobKind


def run(spec) -> int:
    from hpcllm.jobs.lock import release_run_dirs
    from hpcllm.jobs.runtime import record_start, start
    from hpcllm.train.signals import catch_early_signals
    from hpcllm.train.trainer import train

    catch_early_signals()  # replaces submitit's handlers too: the trainer decides what a signal means
    comm = start(spec)
    # rank 0 reads what it resumes from before the trainer truncates metrics.jsonl to the checkpoint
    record = record_start(spec, comm, **(start_fields(spec) if comm.rank == 0 else {}))
    from hpcllm import monitor

    mon = monitor.start(spec, comm)  # live Prometheus metrics, when the spec's metrics section asks
    # no `finally: comm.close()`: closing waits for the peers (a barrier on some backends), so on an
    # error it would keep this rank from reaching the CLI, which reports the error and ends every rank
    try:
        result = train(spec, comm, start_id=record.id)  # metrics.jsonl's records name their start
    except BaseException as e:  # the error still goes up to the CLI; the record says how the start ended
        record.end("crashed", gather=False, reason=f"{type(e).__name__}: {e}"[:500])
        mon.close("crashed")
        raise
    from hpcllm.comm.torch_group import close_process_group

    close_process_group(comm)  # the gloo group set up beside an mpi or horovod job (checkpoints, meshes)
    record.end("stopped" if result.stopped else "finished", reason=result.stopped, step=result.step,
               checkpoint=result.checkpoint)
    mon.close("stopped" if result.stopped else "finished")
    comm.close()
    release_run_dirs()
    if result.stopped:
        return EXIT_REQUEUE
    if result.step < spec.train.max_steps:  # a bug, never a success: say so rather than exit 0
        raise IncompleteError(f"training ended at step {result.step} of {spec.train.max_steps} without a stop "
                              f"request (run_dir {spec.run_dir})")
    return 0


def start_fields(spec) -> dict:
    """What a training start records beyond the common fields (hpcllm.jobs.runtime.record_start): the
    dataset's manifest hash, the checkpoint it resumes from (the trainer resumes from the same latest
    complete one), and the last step metrics.jsonl holds from before — read before the trainer
    truncates it to the checkpoint, it is the last step the previous start logged, so the report can
    count the steps redone."""
    from hpcllm.checkpoint import latest_checkpoint
    from hpcllm.config import to_dict
    from hpcllm.jobs.runtime import manifest_sha256
    from hpcllm.train.metrics import read_metrics

    ckpt = latest_checkpoint(spec.run_dir, warn=False) if spec.train.resume else None
    resume = None
    if ckpt is not None:
        resume = {"path": str(ckpt), "step": int(ckpt.name.split("_")[-1])}
    try:
        recs = read_metrics(spec.run_dir)
    except ValueError:
        recs = []
    last = recs[-1] if recs else None
    return dict(dataset_manifest_sha256=manifest_sha256(spec.data.dataset), resume_from=resume,
                train=to_dict(spec.train),  # hpcllm report's checkpoint interval advice reads it
                previous_last_logged={k: last.get(k) for k in ("step", "time", "start", "cpu_s_ranks")} if last else None)


def incomplete(spec) -> str | None:
    """A training job is complete only when its run dir holds the checkpoint of step max_steps (the
    trainer always writes it last; a checkpoint directory exists only once it is whole, and one that
    was damaged since does not count)."""
    from hpcllm.checkpoint import is_complete, list_checkpoints

    ckpts = [c for c in list_checkpoints(spec.run_dir) if is_complete(c)]
    final = f"step_{spec.train.max_steps:08d}"
    if any(p.name == final for p in ckpts):
        return None
    latest = f"latest {ckpts[-1].name}" if ckpts else "no checkpoint at all"
    return f"no checkpoint of step {spec.train.max_steps} (train.max_steps) in {spec.run_dir}/checkpoints ({latest})"


KIND = JobKind(name="train", help="train a model (1 process, mpirun or srun); resumes from the latest checkpoint",
               inputs=lambda spec: [("data.dataset", spec.data.dataset)], run=run, incomplete=incomplete,
               outputs=lambda spec: [("run_dir", spec.run_dir)], requeue=True, restarts_in_job=True,
               holds_run_dir=lambda spec: (0, 1))
