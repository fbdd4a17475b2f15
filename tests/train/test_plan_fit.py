"""`hpcllm plan --memory-per-rank`: whether each rank's part fits, the margin, and what to change."""

import json
import subprocess
import sys

import pytest

from hpcllm.parallel.cli import parse_bytes


def plan(tmp_path, *args):
    spec = tmp_path / "llama8b.yaml"
    spec.write_text(json.dumps({"kind": "train", "run_dir": str(tmp_path / "run"),
                                "model": {"arch": "llama", "size": "llama3-8b"},
                                "train": {"batch_size": 1, "seq_len": 2048}, "slurm": {"gpus_per_node": 8}}))
    return subprocess.run([sys.executable, "-m", "hpcllm.cli", "plan", str(spec), *args], capture_output=True,
                          text=True, timeout=120)


def test_a_plan_that_does_not_fit_says_so_and_names_plans_that_do(tmp_path):
    p = plan(tmp_path, "--world", "1", "--memory-per-rank", "80GiB")
    # 8.03B parameters x 16 bytes (fp32 weights, gradients, AdamW moments) = 119.7 GiB > 80 GiB
    assert p.returncode == 2, p.stderr
    assert "fit in 80.00 GiB per rank: state 119.66 GiB" in p.stdout and "DOES NOT FIT, short by" in p.stdout, p.stdout
    assert "no plan on 1 ranks fits" in p.stdout
    assert "the plan does not fit in 80.00 GiB per rank" in p.stderr and "Traceback" not in p.stderr
    p = plan(tmp_path, "--world", "8", "--memory-per-rank", "80GiB")
    assert p.returncode == 2 and "plans on 8 ranks that fit" in p.stdout, p.stdout
    first = p.stdout.split("plans on 8 ranks that fit")[1].splitlines()[1]
    assert first.strip().startswith("parallel.shard=full:"), p.stdout  # one change is enough: FSDP over 8 ranks
    p = plan(tmp_path, "--world", "8", "--memory-per-rank", "80GiB", "parallel.shard=full")
    assert p.returncode == 0, p.stderr
    # on GPUs (slurm.gpus_per_node) train.dtype auto is bf16: 34 bytes per layer position and width
    assert "state 14.96 GiB + activations ~" in p.stdout and "bf16" in p.stdout and ": FITS, margin" in p.stdout


def test_memory_sizes_parse_in_both_unit_systems():
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("40GB") == 40 * 10**9
    assert parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("1.5TiB") == int(1.5 * 2**40)
    with pytest.raises(Exception, match="not a memory size"):
        parse_bytes("lots")


@pytest.mark.gpu
def test_the_default_memory_per_rank_is_what_torch_reports_for_the_gpu():
    """Asked of the CUDA driver without importing torch: the same bytes as torch's figure."""
    import torch

    from hpcllm.parallel.cli import _local_gpu_memory

    assert _local_gpu_memory() == torch.cuda.get_device_properties(0).total_memory


def test_without_a_gpu_there_is_no_default_memory_per_rank():
    import torch

    from hpcllm.parallel.cli import _local_gpu_memory

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the test above checks its figure")
    assert _local_gpu_memory() is None
