"""`hpcllm bench train` runs end to end on a tiny model (the figures themselves go to docs/performance.md)."""

import re
import subprocess
import sys

import pytest

from tests.mpi_util import mpi_env

TINY = ["--model", "tiny", "--batch-size", "2", "--seq-len", "32", "--steps", "2", "--rounds", "2", "--warmup", "1"]


def bench(*args: str) -> str:
    p = subprocess.run([sys.executable, "-m", "hpcllm.cli", "bench", "train", *TINY, *args],
                       capture_output=True, text=True, env=mpi_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def figures(out: str) -> dict[str, float]:
    return {k: float(v.replace(",", "")) for k, v in re.findall(
        r"(hpcllm|torch DDP \(gloo\)|nanoGPT-style loop|no communication|alone)\s+([\d,]+) tokens/s", out)}


@pytest.mark.mpi
def test_bench_train_on_two_ranks_prints_every_figure():
    out = bench()
    got = figures(out)
    assert set(got) == {"hpcllm", "torch DDP (gloo)", "no communication", "alone"}, out
    assert all(v > 0 for v in got.values()), out
    assert re.search(r"ratio hpcllm / torch DDP \(gloo\)\s+\d+\.\d\dx  \(per round \d+\.\d\d-\d+\.\d\dx\)", out), out
    assert re.search(r"scaling efficiency 2 vs 1 rank  hpcllm \d+\.\d\d, DDP \d+\.\d\d, "
                     r"ceiling without communication \d+\.\d\d", out), out


def test_bench_train_single_process_against_the_nanogpt_loop():
    # the GPU benchmark's shape (one rank, bf16 autocast, the nanoGPT-style peer) on the CPU
    out = bench("--ranks", "1", "--dtype", "bf16")
    got = figures(out)
    assert set(got) == {"hpcllm", "nanoGPT-style loop"} and all(v > 0 for v in got.values()), out
    assert "bf16" in out and re.search(r"ratio hpcllm / nanoGPT-style loop\s+\d+\.\d\dx", out), out
