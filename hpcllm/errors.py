"""User-facing errors.

Anything a user can cause (a bad job spec, a missing file, a corrupt shard) raises a subclass of
`HpcllmError`. The CLI prints its message — which names the file, key or record — and exits with
`exit_code`, instead of showing a deep traceback.
"""


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
    """A dataset, shard or input file is missing, corrupt or inconsistent."""

    exit_code = 5
