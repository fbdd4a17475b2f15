"""What every job does first: check its inputs, join the other ranks, take the run dir's lock (one
job per run_dir: hpcllm.jobs.lock), set up per-rank logging in the run dir.

    comm = start(spec)     # in each job kind's run()
    ...
    comm.close()
"""

from __future__ import annotations

import logging
import os

from hpcllm.comm import Communicator, init_comm
from hpcllm.config import JobSpec
from hpcllm.jobs import get_kind
from hpcllm.jobs.lock import hold_run_dir
from hpcllm.jobs.preflight import check_run_dir, preflight
from hpcllm.log import setup_logging

log = logging.getLogger("hpcllm")


def start(spec: JobSpec) -> Communicator:
    kind = get_kind(spec.kind)
    preflight(spec, kind)  # before joining the other ranks: a missing input fails every rank at once
    # every rank, before joining: each then fails with the same one line (when only rank 0 checked,
    # the others raced on to create the log dir and died of a raw traceback)
    check_run_dir(spec.run_dir, kind.run_dir_error)
    comm = init_comm(spec.dist)
    notes = []
    if kind.holds_run_dir is not None:  # before the logs: a refused job writes nothing into the holder's run_dir
        task, tasks = kind.holds_run_dir(spec)
        notes = hold_run_dir(spec.run_dir, comm, spec.kind, task, tasks, kind.run_dir_error)
    setup_logging(comm.rank, spec.run_dir if spec.run_dir else None)
    for line in notes:
        log.warning("%s", line)
    log.info("%s job '%s': %d rank(s), backend %s, device %s, run_dir %s", spec.kind, spec.name, comm.size,
             comm.name, comm.device, spec.run_dir)
    w = comm.world  # every rank's log says where it runs (rank 0's on the console too)
    log.info("rank %d/%d: node %d (%s), local rank %d/%d, pid %d", w.rank, w.size, w.node_rank, w.hostname,
             w.local_rank, w.local_size, os.getpid())
    return comm
