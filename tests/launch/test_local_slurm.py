"""The local Slurm test clusters are real: MPI jobs under srun --mpi=pmix, accounting in sacct; on the
2-node cluster tasks land on both nodes and MPI spans them."""

import sys

import pytest

from tests.slurm_util import quote, require_slurm, run, sacct_rows, sbatch, slurm_env, wait_job

pytestmark = pytest.mark.slurm

ALLREDUCE = (
    "from mpi4py import MPI; import numpy as np; c = MPI.COMM_WORLD; y = np.zeros(1); "
    "c.Allreduce(np.array([c.rank + 1.0]), y); print('rank', c.rank, 'size', c.size, 'sum', y[0])"
)


def test_two_task_mpi_allreduce_under_srun(tmp_path):
    require_slurm()
    script = f"""#!/bin/bash
#SBATCH --job-name=hpcllm-test-allreduce
#SBATCH --ntasks=2
#SBATCH --time=00:02:00
#SBATCH --output={tmp_path}/out-%j.txt
srun {quote(sys.executable, "-c", ALLREDUCE)}
"""
    job = sbatch(script, tmp_path)
    assert wait_job(job, 120) == "COMPLETED"
    lines = sorted((tmp_path / f"out-{job}.txt").read_text().split("\n"))
    assert [line for line in lines if line] == ["rank 0 size 2 sum 3.0", "rank 1 size 2 sum 3.0"]
    rows = {r["JobID"]: r for r in sacct_rows(job)}
    assert rows[str(job)]["State"] == "COMPLETED" and rows[str(job)]["ExitCode"] == "0:0"
    step = rows[f"{job}.0"]
    assert step["State"] == "COMPLETED" and step["NTasks"] == "2"


def test_failing_job_is_accounted_as_failed(tmp_path):
    require_slurm()
    job = sbatch(f"#!/bin/bash\n#SBATCH -n 1\n#SBATCH -t 1\n#SBATCH -o {tmp_path}/o.txt\nexit 3\n", tmp_path)
    assert wait_job(job, 60) == "FAILED"
    row = [r for r in sacct_rows(job) if r["JobID"] == str(job)][0]
    assert row["ExitCode"] == "3:0"


def test_srun_without_pmix_is_diagnosed(tmp_path):
    """Every task would think it is rank 0: hpcllm must say so and exit, not train N copies."""
    require_slurm()
    hpcllm = quote(sys.executable, "-m", "hpcllm.cli", "bench", "allreduce", "--sizes", "4K", "--rounds", "1")
    script = f"""#!/bin/bash
#SBATCH -n 2
#SBATCH -t 2
#SBATCH -o {tmp_path}/o.txt
cd {quote(str(__import__('pathlib').Path(__file__).resolve().parents[2]))}
srun --mpi=none {hpcllm}
"""
    job = sbatch(script, tmp_path)
    assert wait_job(job, 120) == "FAILED"
    out = (tmp_path / "o.txt").read_text()
    assert "srun without --mpi=pmix?" in out, out[-2000:]
    assert "Traceback" not in out


@pytest.mark.horovod
def test_bench_allreduce_under_srun_all_backends(tmp_path):
    require_slurm()
    repo = __import__("pathlib").Path(__file__).resolve().parents[2]
    hpcllm = quote(sys.executable, "-m", "hpcllm.cli", "bench", "allreduce", "--backend", "mpi,torch,horovod",
                   "--sizes", "4K,1M", "--rounds", "1")
    script = f"#!/bin/bash\n#SBATCH -n 2\n#SBATCH -t 3\n#SBATCH -o {tmp_path}/o.txt\ncd {quote(str(repo))}\nsrun {hpcllm}\n"
    job = sbatch(script, tmp_path)
    assert wait_job(job, 180) == "COMPLETED", (tmp_path / "o.txt").read_text()[-3000:]
    out = (tmp_path / "o.txt").read_text()
    assert "2 ranks" in out
    for impl in ("mpi", "torch", "horovod"):
        assert f"# backend {impl}" in out
        rows = [line.split() for line in out.splitlines() if not line.startswith("#") and line.split()[2:3] == [impl]]
        assert len(rows) == 2 and all(len(r) == 7 and float(r[3]) > 0 and r[6].endswith("x") for r in rows), out


def test_train_under_srun_two_tasks(tmp_path):
    """`hpcllm train` as 2 Slurm tasks (srun --mpi=pmix): ranks from Slurm, MPI backend, a checkpoint."""
    require_slurm()
    import json

    repo = __import__("pathlib").Path(__file__).resolve().parents[2]
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"{i}.txt").write_text(f"document {i} " + "abc def ghi " * (200 + i))
    prep = tmp_path / "prep.yaml"
    prep.write_text(json.dumps({"kind": "prepare", "run_dir": str(tmp_path / "p"),
                                "data": {"inputs": [str(corpus)], "dataset": str(tmp_path / "ds"), "val_fraction": 0.2}}))
    train = tmp_path / "train.yaml"
    train.write_text(json.dumps({
        "kind": "train", "name": "srun", "run_dir": str(tmp_path / "run"), "data": {"dataset": str(tmp_path / "ds")},
        "model": {"size": "custom", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 64},
        "train": {"max_steps": 6, "batch_size": 2, "seq_len": 32, "log_interval": 2, "eval_interval": 3,
                  "progress": False}}))
    py = quote(sys.executable)
    script = f"""#!/bin/bash
#SBATCH -n 2
#SBATCH -t 3
#SBATCH -o {tmp_path}/o.txt
cd {quote(str(repo))}
srun -n 2 {py} -m hpcllm.cli prepare {quote(str(prep))}
srun {py} -m hpcllm.cli train {quote(str(train))}
"""
    job = sbatch(script, tmp_path)
    assert wait_job(job, 180) == "COMPLETED", (tmp_path / "o.txt").read_text()[-3000:]
    out = (tmp_path / "o.txt").read_text()
    assert "2 rank(s), backend mpi" in out
    assert (tmp_path / "run" / "checkpoints" / "step_00000006" / "dcp" / ".metadata").exists()
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]
    assert {r["State"] for r in sacct_rows(job)} == {"COMPLETED"}


SPAN = """
import os, socket
import numpy as np
from mpi4py import MPI
c = MPI.COMM_WORLD
x = np.full(1 << 20, c.rank + 1.0)  # 8 MiB: shared memory within a node, TCP between the nodes
y = np.empty_like(x)
c.Allreduce(x, y)
node = c.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks Open MPI sees on this rank's node
e = os.environ
print(c.rank, e["SLURM_NODEID"], e["SLURM_LOCALID"], e["SLURMD_NODENAME"], socket.gethostname(),
      node.rank, node.size, float(y.min()), float(y.max()), flush=True)
"""


@pytest.mark.xdist_group("slurm-2node")  # all 4 CPUs of the 2-node cluster: never beside test_two_node.py
def test_two_node_cluster_places_tasks_per_node_and_mpi_spans_both(tmp_path):
    """2 nodes x 2 tasks: tasks 0,1 on n1 and 2,3 on n2 with node-local ids 0,1; each node's processes
    see their node's hostname; Open MPI's shared-memory domain is the node; a large allreduce is right."""
    require_slurm(two_node=True)
    env = slurm_env(two_node=True)
    (tmp_path / "span.py").write_text(SPAN)
    script = f"""#!/bin/bash
#SBATCH --job-name=hpcllm-test-span
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=2
#SBATCH --time=00:02:00
#SBATCH --output={tmp_path}/out-%j.txt
srun {quote(sys.executable, str(tmp_path / "span.py"))}
"""
    job = sbatch(script, tmp_path, env=env)
    assert wait_job(job, 120, env=env) == "COMPLETED", (tmp_path / f"out-{job}.txt").read_text()[-3000:]
    hosts = dict(line.split() for line in run(["sinfo", "-N", "-h", "-o", "%N %n"], env=env).stdout.splitlines())
    rows = sorted(line.split() for line in (tmp_path / f"out-{job}.txt").read_text().splitlines() if line[:1].isdigit())
    # rank, SLURM_NODEID, SLURM_LOCALID, node, hostname, rank and size in the node's MPI domain, allreduce
    want = [[str(r), str(r // 2), str(r % 2), f"n{r // 2 + 1}", hosts[f"n{r // 2 + 1}"], str(r % 2), "2",
             "10.0", "10.0"] for r in range(4)]
    assert rows == want
