"""What every job does first: join the other ranks, set up per-rank logging in the run dir.

    comm = runtime.start(spec)     # in prepare / train / infer entry points
    ...
    comm.close()
"""

from __future__ import annotations

import logging
import os

from hpcllm import dist
from hpcllm.config import JobSpec
from hpcllm.log import setup_logging

log = logging.getLogger("hpcllm")


def start(spec: JobSpec) -> dist.Communicator:
    from hpcllm.launch.preflight import preflight

    preflight(spec)  # before joining the other ranks: a missing input fails every rank at once
    comm = dist.init(spec.dist)
    if comm.rank == 0:
        os.makedirs(spec.run_dir, exist_ok=True)
    setup_logging(comm.rank, spec.run_dir if spec.run_dir else None)
    log.info("%s job '%s': %d rank(s), backend %s, device %s, run_dir %s", spec.kind, spec.name, comm.size,
             comm.name, comm.device, spec.run_dir)
    return comm
