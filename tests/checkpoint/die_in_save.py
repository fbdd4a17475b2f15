"""`python -m tests.checkpoint.die_in_save RANK_TO_DIE hpcllm ARGS...`: the hpcllm CLI, except that
rank RANK_TO_DIE ends (os._exit, no goodbye) once it has written its part of a checkpoint, right
before the barrier that closes the save — a rank lost at the end of a sharded save."""

import contextlib
import os
import sys

import hpcllm.checkpoint.sharded as sharded
from hpcllm.cli import main

dying_rank = int(sys.argv[1])
_write_together = sharded.shared_atomic_dir


@contextlib.contextmanager
def _dies_before_closing_barrier(final, leader, barrier):
    with _write_together(final, leader, barrier) as tmp:
        yield tmp
        if int(os.environ["RANK"]) == dying_rank:
            os._exit(17)


sharded.shared_atomic_dir = _dies_before_closing_barrier
sys.exit(main(sys.argv[2:]))
