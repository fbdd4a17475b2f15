"""What every job does first: check its inputs, join the other ranks, take the run dir's lock (one
job per run_dir: hpcllm.jobs.lock), set up per-rank logging in the run dir; then record the start
in run_dir/provenance.jsonl (hpcllm.provenance).

    comm = start(spec)                      # in each job kind's run()
    record = record_start(spec, comm)       # the job owns its record: record.id names this start
    ...
    record.end("finished")
    comm.close()
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from hpcllm import provenance
from hpcllm.comm import Communicator, init_comm
from hpcllm.config import JobSpec, dump_spec, to_dict
from hpcllm.jobs.kind import get_kind
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


def record_start(spec: JobSpec, comm: Communicator, **fields) -> provenance.Start:
    """This start's record in run_dir/provenance.jsonl: what every start records, what the spec says
    (kind, name, the parallel plan, the resolved spec's hash), then the kind's own `fields` (rank 0's
    count). A run_dir that cannot take it is the kind's run_dir error."""
    mine = dict(kind=spec.kind, name=spec.name, plan=to_dict(spec.parallel),
                spec_sha256=hashlib.sha256(dump_spec(spec).encode()).hexdigest(), **fields) if comm.rank == 0 else {}
    return provenance.begin(spec.run_dir, comm, error=get_kind(spec.kind).run_dir_error, **mine)


def manifest_sha256(dataset: str | Path) -> str | None:
    """sha256 of a dataset's manifest.json — the very file the job reads (hpcllm.data.shards.manifest_path):
    one that links out of the dataset is not hashed (the job then refuses it, naming it)."""
    from hpcllm.data.shards import manifest_path
    from hpcllm.errors import DataError

    try:
        return provenance.sha256_file(manifest_path(dataset))
    except DataError:
        return None
