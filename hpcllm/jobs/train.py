"""The `train` job: data-parallel training (hpcllm.train.trainer), requeued when it stops on a
signal or the time limit, and failed — never reported complete — when it ends short of max_steps."""

from __future__ import annotations

from hpcllm.errors import EXIT_REQUEUE, IncompleteError
from hpcllm.jobs import JobKind


def run(spec) -> int:
    from hpcllm.jobs.runtime import start
    from hpcllm.train.signals import catch_early_signals
    from hpcllm.train.trainer import train

    catch_early_signals()  # replaces submitit's handlers too: the trainer decides what a signal means
    comm = start(spec)
    try:
        result = train(spec, comm)
    finally:
        comm.close()
    if result.stopped:
        return EXIT_REQUEUE
    if result.step < spec.train.max_steps:  # a bug, never a success: say so rather than exit 0
        raise IncompleteError(f"training ended at step {result.step} of {spec.train.max_steps} without a stop "
                              f"request (run_dir {spec.run_dir})")
    return 0


KIND = JobKind(name="train", help="train a model (1 process, mpirun or srun); resumes from the latest checkpoint",
               inputs=lambda spec: [("data.dataset", spec.data.dataset)], run=run, requeue=True)
