"""User-facing errors and the exit codes of every hpcllm command, in one table.

Anything a user can cause (a bad job spec, a missing file, a corrupt shard) raises a subclass of
`HpcllmError`. The CLI prints its message — which names the file, key or record — on stderr and in
the rank's log, and exits with `exit_code`, instead of showing a deep traceback.

    code  meaning                                                   raised as
    0     done
    1     an error hpcllm did not classify (a bug: please report)   HpcllmError
    2     bad job spec, override or command line                    ConfigError
    3     the distributed runtime is misconfigured                  DistError
    4     a collective did not complete within dist.timeout_s       CollectiveTimeout (watchdog)
    5     bad data: dataset, shard, record, weights file            DataError
    6     missing, unreadable or untrusted checkpoint               CheckpointError
    7     training fault: non-finite loss, incompatible resume      TrainingError
    8     inference set-up: model/tokenizer mismatch, output dir    InferError
    9     a job ended without finishing its work                    IncompleteError
    10    an input the spec names is gone at run time (dataset, model)  MissingInputError
    11    the run_dir is held by another job (one job per run_dir)  RunDirBusy
    85    stopped on request and checkpointed: requeue me           EXIT_REQUEUE
"""

EXIT_OK = 0
EXIT_REQUEUE = 85  # the sbatch templates and the submitit runner requeue a training job on it


class HpcllmError(Exception):
    exit_code = 1


class ConfigError(HpcllmError):
    """Bad job spec or override: unknown key, wrong type, missing file."""

    exit_code = 2


class DistError(HpcllmError):
    """The distributed runtime is misconfigured (rank/size disagreement, missing backend...)."""

    exit_code = 3


class CollectiveTimeout(DistError):
    """A collective did not complete within dist.timeout_s."""

    exit_code = 4


class DataError(HpcllmError):
    """A dataset, shard, record or input file is missing, corrupt or inconsistent."""

    exit_code = 5


class CheckpointError(HpcllmError):
    """A checkpoint is missing, unreadable, untrusted or does not fit the model."""

    exit_code = 6


class TrainingError(HpcllmError):
    """Training cannot go on: non-finite loss, a resume that does not fit this run."""

    exit_code = 7


class InferError(HpcllmError):
    """An inference job cannot run: model/tokenizer mismatch, stale or unwritable outputs."""

    exit_code = 8


class IncompleteError(HpcllmError):
    """A job ended without doing all of its work (a step that failed to start, a run that stopped
    short without a stop request): it must not be reported as complete."""

    exit_code = 9


class MissingInputError(HpcllmError):
    """An input the job spec names (dataset, model directory, prompts) was there when the job was
    submitted but is missing or unreadable when it runs: the spec is fine, the world changed."""

    exit_code = 10


class RunDirBusy(HpcllmError):
    """Another job (its host, pid and Slurm id named) holds the run_dir's lock: two jobs on one run_dir
    would write the same checkpoints and metrics."""

    exit_code = 11


EXIT_CODES = {
    EXIT_OK: "done",
    HpcllmError.exit_code: "unclassified error",
    ConfigError.exit_code: "bad job spec or command line",
    DistError.exit_code: "distributed set-up",
    CollectiveTimeout.exit_code: "collective timed out",
    DataError.exit_code: "bad data",
    CheckpointError.exit_code: "bad checkpoint",
    TrainingError.exit_code: "training fault",
    InferError.exit_code: "inference set-up",
    IncompleteError.exit_code: "job did not finish",
    MissingInputError.exit_code: "input missing at run time",
    RunDirBusy.exit_code: "run_dir held by another job",
    EXIT_REQUEUE: "stopped and checkpointed (requeue)",
}
