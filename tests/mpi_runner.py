"""Run one test body on every rank: `python -m tests.mpi_runner MODULE:FUNC OUTDIR KWARGS_JSON`.

Started by `tests.mpi_util.run_on_ranks` under `mpirun -np N`. Each rank calls FUNC(**kwargs) and
writes what it returned (JSON) to OUTDIR/rank<R>.json, or its traceback to OUTDIR/rank<R>.err and
exits 1, so the test can assert on the result of every rank.
"""

import faulthandler
import gc
import importlib
import json
import os
import sys
import traceback

from hpcllm.comm.world import detect_world


def main() -> None:
    target, outdir, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    rank = detect_world().rank
    # a hung body prints every thread's stack and exits before the test's own timeout
    dump_after = float(os.environ.get("HPCLLM_TEST_DUMP_AFTER", "0"))
    if dump_after > 0:
        faulthandler.dump_traceback_later(dump_after, exit=True)
    mod, func = target.split(":")
    try:
        result = getattr(importlib.import_module(mod), func)(**kwargs)
    except BaseException:
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        sys.stderr.write(f"[rank {rank}] {traceback.format_exc()}")
        sys.stderr.flush()
        os._exit(1)
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    # a body that left a torch.distributed group open: close it together (a rank leaving while gloo's
    # threads still serve its peer can abort at exit, failing a test whose body passed)
    if "torch.distributed" in sys.modules:
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.barrier()
            tdist.destroy_process_group()
    gc.freeze()  # as hpcllm.cli.main_exit: no last collections over torch's objects (~1 CPU-s per rank)


if __name__ == "__main__":
    main()
