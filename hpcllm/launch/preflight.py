"""Checks at the start of every job, on every rank, that fail in seconds with a diagnosis instead of
hanging or failing an hour later: the inputs the job will read exist, the job got the GPUs it asked
for (one per rank), and (torch backend) the rendezvous address resolves. Rank/size agreement between
MPI and the launcher is checked when the communicator starts (hpcllm.dist)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from hpcllm.config import JobSpec
from hpcllm.errors import ConfigError, DistError


def preflight(spec: JobSpec) -> None:
    need: list[tuple[str, str]] = []
    if spec.kind == "train":
        need.append(("data.dataset", spec.data.dataset))
    elif spec.kind == "infer":
        need += [("infer.prompts", spec.infer.prompts), ("infer.model", spec.infer.model)]
    for key, path in need:
        if not path:
            raise ConfigError(f"{key} is not set")
        if not Path(path).exists():
            raise ConfigError(f"{key}: '{path}' does not exist (on {socket.gethostname()}: is it on a shared filesystem?)")
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
