"""`hpcllm bench train` runs end to end on a tiny model (the figures themselves go to docs/performance.md)."""

import re
import subprocess
import sys

import pytest

from tests.mpi_util import env_without_submitit, mpi_env

TINY = ["--model", "tiny", "--batch-size", "2", "--seq-len", "32", "--steps", "2", "--rounds", "2", "--warmup", "1"]


def bench(*args: str, env: dict | None = None) -> str:
    p = subprocess.run([sys.executable, "-m", "hpcllm.cli", "bench", "train", *TINY, *args],
                       capture_output=True, text=True, env=mpi_env(env), timeout=300)
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
    ratio = re.search(r"ratio hpcllm / torch DDP \(gloo\)\s+(\d+\.\d\d)x  \(per round (\d+\.\d\d)-(\d+\.\d\d)x\)", out)
    assert ratio, out
    # the ratio is the quotient of the two figures it stands beside (to their printed rounding)
    assert close(float(ratio[1]), got["hpcllm"] / got["torch DDP (gloo)"]), out
    assert float(ratio[2]) <= float(ratio[3]), out
    eff = re.search(r"scaling efficiency 2 vs 1 rank  hpcllm (\d+\.\d\d), DDP (\d+\.\d\d), "
                    r"ceiling without communication (\d+\.\d\d)", out)
    assert eff, out
    ideal = 2 * got["alone"]  # "1 rank alone" is the figure named alone
    assert close(float(eff[1]), got["hpcllm"] / ideal) and close(float(eff[2]), got["torch DDP (gloo)"] / ideal)
    assert close(float(eff[3]), got["no communication"] / ideal), out


def close(printed: float, computed: float) -> bool:
    return abs(printed - computed) <= 0.01 + 0.01 * computed


def test_bench_train_single_process_against_the_nanogpt_loop():
    # the GPU benchmark's shape (one rank, bf16 autocast, the nanoGPT-style peer) on the CPU
    out = bench("--ranks", "1", "--dtype", "bf16")
    got = figures(out)
    assert set(got) == {"hpcllm", "nanoGPT-style loop"} and all(v > 0 for v in got.values()), out
    assert "bf16" in out and re.search(r"ratio hpcllm / nanoGPT-style loop\s+\d+\.\d\dx", out), out


def test_bench_train_times_each_plan_forced_on_one_rank(tmp_path):
    # scripts/gpu_check.sh's bench-plans part (issues 13 and 14) on the CPU, as on the GPU machine
    # (no mpirun, no submitit): one rank, bf16, FSDP2 forced on a world of one and the tensor-parallel
    # path at tp=1 (DTensor parameters) beside the plain plan, over a one-rank gloo group
    no_submitit = env_without_submitit(tmp_path)
    out = bench("--ranks", "1", "--dtype", "bf16", "--shard", "none,full", "--tp-overhead",
                env={"PYTHONPATH": no_submitit["PYTHONPATH"]})
    assert "each plan forced on a world of one" in out and "(gloo)" in out, out
    rows = {m[0]: [float(v.replace(",", "")) for v in m[1:]] for m in re.findall(
        r"^  (none|full|tp=1 DTensor)\s+([\d,]+)\s+(\d+\.\d\d)x \(\d+\.\d\d-\d+\.\d\dx\)\s+(\d+\.\d)\s+"
        r"(\d+\.\d)\s+(\d+\.\d)\s+(\d+\.\d)\s+(\d+\.\d\d)x$", out, re.M)}
    assert set(rows) == {"none", "full", "tp=1 DTensor"}, out
    for tokens_per_s, vs_none, update_ms, params, grads, optimizer, state in rows.values():
        assert tokens_per_s > 0 and update_ms > 0 and params > 0 and grads > 0 and optimizer == 2 * params
        assert state == 1.0  # one rank holds everything in every plan
    assert rows["none"][1] == 1.0
    assert re.search(r"^  ratio full / none: \d+\.\d\dx tokens/s$", out, re.M), out
    assert re.search(r"^  ratio DTensor tp=1 / plain: \d+\.\d\dx tokens/s — overhead -?\d+\.\d% \(issue 14's goal "
                     r"<= 5%, a GPU figure\)$", out, re.M), out


def test_bench_train_tp_overhead_needs_one_rank():
    p = subprocess.run([sys.executable, "-m", "hpcllm.cli", "bench", "train", "--tp-overhead", "--ranks", "2"],
                       capture_output=True, text=True, env=mpi_env(), timeout=60)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "--tp-overhead measures the DTensor path's own cost on one device: use --ranks 1, not 2" in p.stderr


def test_bench_train_does_not_force_zero1_on_one_rank():
    p = subprocess.run([sys.executable, "-m", "hpcllm.cli", "bench", "train", "--ranks", "1", "--shard",
                        "none,optimizer"], capture_output=True, text=True, env=mpi_env(), timeout=60)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "--shard optimizer needs --ranks 2 or more" in p.stderr, p.stderr
