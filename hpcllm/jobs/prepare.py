"""The `prepare` job: text -> sharded HDF5 dataset (hpcllm.data.prepare), on any number of ranks."""

from __future__ import annotations

import json
from pathlib import Path

from hpcllm.jobs.kind import JobKind


def run(spec) -> int:
    from hpcllm import monitor
    from hpcllm.data.prepare import prepare
    from hpcllm.jobs.runtime import start

    comm = start(spec)
    mon = monitor.start(spec, comm)  # live Prometheus metrics, when the spec's metrics section asks
    try:
        summary = prepare(spec.data, comm)  # on an error, no comm.close(): it would wait for the peers
    except BaseException:
        mon.close("crashed")
        raise
    mon.prepare_done(summary)
    mon.close("finished")
    comm.close()
    if comm.rank == 0:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()}), flush=True)
    return 0


def inputs(spec) -> list[tuple[str, str]]:
    # stdlib: and globs are resolved by the job itself; only plain paths can be checked up front
    return [("data.inputs", p) for p in spec.data.inputs if p.strip() != "stdlib:" and not any(c in p for c in "*?[")]


def incomplete(spec) -> str | None:
    from hpcllm.data.shards import MANIFEST

    # prepare removes the manifest first and writes it last: without it the dataset is unfinished
    if not (Path(spec.data.dataset) / MANIFEST).is_file():
        return f"no {MANIFEST} in data.dataset {spec.data.dataset}: the dataset was not finished"
    return None


KIND = JobKind(name="prepare", help="tokenize inputs into a sharded HDF5 dataset (1 process, mpirun or srun)",
               inputs=inputs, run=run, incomplete=incomplete,
               outputs=lambda spec: [("data.dataset", spec.data.dataset)])
