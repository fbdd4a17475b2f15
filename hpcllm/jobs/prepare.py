"""The `prepare` job: text -> sharded HDF5 dataset (hpcllm.data.prepare), on any number of ranks."""

from __future__ import annotations

import json

from hpcllm.jobs import JobKind


def run(spec) -> int:
    from hpcllm.data.prepare import prepare
    from hpcllm.jobs.runtime import start

    comm = start(spec)
    summary = prepare(spec.data, comm)  # on an error, no comm.close(): it would wait for the peers
    comm.close()
    if comm.rank == 0:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()}), flush=True)
    return 0


def inputs(spec) -> list[tuple[str, str]]:
    # stdlib: and globs are resolved by the job itself; only plain paths can be checked up front
    return [("data.inputs", p) for p in spec.data.inputs if p.strip() != "stdlib:" and not any(c in p for c in "*?[")]


KIND = JobKind(name="prepare", help="tokenize inputs into a sharded HDF5 dataset (1 process, mpirun or srun)",
               inputs=inputs, run=run)
