"""`hpcllm bench train` runs end to end on a tiny model (the figures themselves go to docs/performance.md)."""

import re
import subprocess
import sys

import pytest

from tests.mpi_util import mpi_env


@pytest.mark.mpi
def test_bench_train_prints_every_figure():
    p = subprocess.run([sys.executable, "-m", "hpcllm.cli", "bench", "train", "--model", "tiny", "--batch-size", "2",
                        "--seq-len", "32", "--steps", "2", "--rounds", "1"],
                       capture_output=True, text=True, env=mpi_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    figures = {k: float(v.replace(",", "")) for k, v in re.findall(
        r"(hpcllm \(mpi\)|torch DDP|no communication|1 rank   hpcllm)\s+([\d,]+) tokens/s", p.stdout)}
    assert len(figures) == 4 and all(v > 0 for v in figures.values()), p.stdout
    assert re.search(r"ratio hpcllm / DDP\s+\d+\.\d\dx", p.stdout)
    assert re.search(r"ceiling without communication \d+\.\d\d", p.stdout), p.stdout
