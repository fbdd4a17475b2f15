"""The parallel layout (hpcllm.parallel.layout): the one place the dimensions, the shard mode they
give, each rank's coordinates and the mesh's shape are worked out — checked here without torch."""

import subprocess
import sys
from pathlib import Path

import pytest

from hpcllm.parallel.config import ParallelConfig
from hpcllm.parallel.layout import Layout

ROOT = Path(__file__).resolve().parents[2]


def test_coordinates_put_tp_innermost_and_pp_outermost():
    layout = ParallelConfig(tp=2, pp=2).layout(8)
    assert layout.dp == 2
    assert [layout.coordinates(r) for r in range(8)] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    # the ranks of a tp group and of a pipeline read the same batches
    assert [layout.dp_rank(r) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert layout.mesh_shape() == ((2, 2, 2), ("pp", "dp", "tp"))


@pytest.mark.parametrize("shard, world, tp, mode, on_meta", [
    ("full", 1, 1, "none", False),        # one rank: nothing to shard, built whole
    ("full", 4, 1, "full", True),
    ("optimizer", 4, 1, "optimizer", False),
    ("optimizer", 2, 2, "none", True),    # tp over the whole world: one dp rank, nothing to shard along dp
    ("none", 4, 2, "none", True),
])
def test_the_shard_mode_is_what_the_data_parallel_ranks_allow(shard, world, tp, mode, on_meta):
    layout = ParallelConfig(shard=shard, tp=tp).layout(world)
    assert (layout.mode, layout.builds_on_meta) == (mode, on_meta)
    assert layout.fsdp_enabled == (mode == "full") and layout.zero1_enabled == (mode == "optimizer")


def test_bytes_per_param_counts_what_each_mode_shards():
    assert ParallelConfig().layout(4).bytes_per_param() == 16  # data parallel: all of it on every rank
    assert ParallelConfig(shard="optimizer").layout(4).bytes_per_param() == 8 + 8 / 4
    assert ParallelConfig(shard="full", tp=2).layout(8).bytes_per_param() == 16 / 8


def test_a_dimension_that_does_not_divide_the_world_is_named():
    with pytest.raises(ValueError, match=r"parallel\.tp=3 does not divide the world of 4"):
        ParallelConfig(tp=3).layout(4)
    with pytest.raises(ValueError, match=r"parallel\.pp=2 x parallel\.tp=2 does not divide the world of 6"):
        ParallelConfig(tp=2, pp=2).layout(6)


def test_the_log_label_and_the_rng_stream():
    layout = ParallelConfig(tp=2, pp=2, sequence_parallel=True, pp_schedule="interleaved1f1b").layout(8)
    assert layout.describe() == "tp=2 sequence_parallel pp=2 (interleaved1f1b, 2 stages per rank)"
    assert Layout(4).describe() == "tp=1 pp=1"
    assert layout.rng_stream(3) == 3  # sequence parallel: each rank's own positions, its own stream
    assert ParallelConfig(tp=2).layout(4).rng_stream(3) == 1  # its dp rank's: the tp group draws alike


def test_the_layout_imports_no_torch():
    """`hpcllm config`, `plan` and `submit` check a layout on a login node."""
    code = "import sys, hpcllm.parallel.layout; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
