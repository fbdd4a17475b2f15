"""`python -m tests.train.slow_background_save STEP MARKER_DIR hpcllm ARGS...`: the hpcllm CLI, except
that the background (async) save of checkpoint step STEP stalls in DCP's writer thread — after it
touches MARKER_DIR/rank_R — so that a test can kill the job while that write is in flight."""

import os
import sys
import time
from pathlib import Path

from torch.distributed.checkpoint import FileSystemWriter

from hpcllm.cli import main

step, markers = int(sys.argv[1]), Path(sys.argv[2])
_write = FileSystemWriter.write_data


def _stalled_write(self, plan, planner):
    if f"step_{step:08d}" in str(self.path):
        (markers / f"rank_{os.environ.get('OMPI_COMM_WORLD_RANK', '0')}").touch()
        time.sleep(600)  # the test kills the job first
    return _write(self, plan, planner)


FileSystemWriter.write_data = _stalled_write
sys.exit(main(sys.argv[3:]))
