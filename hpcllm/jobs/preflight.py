"""Checks at the start of every job, on every rank, that fail in seconds with a diagnosis instead of
hanging or failing an hour later: the inputs the job will read exist, the job got the GPUs it asked
for (one per rank), (torch backend) the rendezvous address resolves, and the run dir can be written.
Rank/size agreement between MPI and the launcher is checked when the communicator starts."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from hpcllm.config import JobSpec
from hpcllm.errors import ConfigError, DistError, MissingInputError


def check_inputs(spec: JobSpec, kind) -> None:
    """Every input path of the job is set and exists (here: on this node). A path that is set but gone
    is not a spec error (submit checked it): the input moved or was deleted, or this node does not see it."""
    for key, path in kind.inputs(spec):
        if not path:
            raise ConfigError(f"{key} is not set")
        if not Path(path).exists():
            raise MissingInputError(f"{key}: '{path}' does not exist (on {socket.gethostname()}: is it on a shared "
                              "filesystem?)")


def check_run_dir(run_dir: str, error: type = ConfigError) -> None:
    """The run dir exists (created if need be) and is writable, or one line saying why not."""
    path = Path(run_dir)
    try:
        (path / "logs").mkdir(parents=True, exist_ok=True)  # every rank's log goes there
        # every rank probes (runtime.start): host and pid keep ranks on other nodes off each other's file
        probe = path / f".write-test-{socket.gethostname()}-{os.getpid()}"
        try:
            with open(probe, "wb") as f:  # a byte, synced: an empty file fits on a full disk, a byte does not
                f.write(b"\0")
                f.flush()
                os.fsync(f.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as e:
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        raise error(f"run_dir {run_dir!r} cannot be written ({e.strerror or e}): "
                    f"{'free some space, or ' if full else ''}choose another run_dir") from None


def preflight(spec: JobSpec, kind) -> None:
    check_inputs(spec, kind)
    if spec.slurm.gpus_per_node and os.environ.get("SLURM_JOB_ID"):
        import torch

        n = torch.cuda.device_count()
        if n == 0:
            raise DistError(f"slurm.gpus_per_node={spec.slurm.gpus_per_node} but no GPU is visible on "
                            f"{socket.gethostname()} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    addr = os.environ.get("MASTER_ADDR")
    if spec.dist.backend == "torch" and addr:
        try:
            socket.getaddrinfo(addr, None)
        except socket.gaierror as e:
            raise DistError(f"MASTER_ADDR={addr!r} does not resolve on {socket.gethostname()}: {e}") from None
