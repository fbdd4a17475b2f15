"""hpcllm's real jobs on the local 2-node cluster (nodes n1, n2: HPCLLM_SLURM_NODES=2 slurm/local/start.sh),
submitted the way users do (`hpcllm render` + sbatch), 2 nodes x 2 tasks: what a single node cannot
show — ranks 0,1 on n1 and 2,3 on n2, the rendezvous across nodes, shared memory per node only.

- training with each backend ends with the weights of 1 rank on the union batch (4 x batch_size);
- a dynamic-schedule inference job writes what 1 process writes;
- a training job stopped by the time-limit signal (USR2: it requeues itself) and then by
  `scontrol requeue` resumes each time and ends bitwise equal to an uninterrupted run.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.slurm_util import require_slurm, run, sbatch, slurm_env, wait_job, wait_until

# the 2-node cluster's own group of make test's workers (tests/conftest.py): beside the 1-node Slurm tests
pytestmark = [pytest.mark.slurm, pytest.mark.mpi, pytest.mark.xdist_group("slurm-2node")]

REPO = Path(__file__).resolve().parents[2]
ENV = slurm_env(two_node=True)
STEPS = 160  # the requeue test needs time to stop the job twice mid-run
UNION_STEP = 20  # union-batch weights are compared here, before fp32 rounding differences grow
ATOL = 5e-5  # measured: 4-5e-6 between 4 ranks and 1 rank at step 20; a wrong batch differs by ~6e-2


def local_env() -> dict:
    """For jobs run here, outside Slurm (references): no SLURM_* of a job the tests may run in."""
    return {k: v for k, v in ENV.items() if not k.startswith("SLURM_")}


def hpcllm(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcllm.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=local_env(), timeout=timeout)


def write_spec(root: Path, spec: dict) -> Path:
    path = root / f"{spec['name']}.yaml"
    path.write_text(json.dumps(spec))
    return path


def submit(root: Path, spec: dict) -> int:
    """`hpcllm render SPEC -o job.sbatch` then `sbatch job.sbatch`, on the 2-node cluster."""
    script = root / f"{spec['name']}.sbatch"
    p = hpcllm("render", str(write_spec(root, spec)), "-o", str(script))
    assert p.returncode == 0, p.stderr
    return sbatch(script.read_text(), root, env=ENV)


def job_output(spec: dict, job: int) -> str:
    logs = Path(spec["run_dir"]) / "logs"
    parts = [logs / f"{spec['name']}-{job}.out"] + sorted(logs.glob(f"{spec['name']}-{job}.rank*.out"))
    return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in parts if p.exists())


def finish(spec: dict, job: int, timeout: float = 240) -> None:
    state = wait_job(job, timeout, env=ENV)
    assert state == "COMPLETED", f"job {job} {state}\n{job_output(spec, job)}"


def node_hostnames() -> dict[str, str]:
    """{node: the hostname its processes see} (n1 -> n1 when each fake node has its own hostname)."""
    out = run(["sinfo", "-N", "-h", "-o", "%N %n"], env=ENV).stdout
    return dict(line.split() for line in out.splitlines())


def check_rank_placement(run_dir: Path, starts: int = 1) -> None:
    """Ranks 0,1 on n1 (node 0, local ranks 0 and 1) and 2,3 on n2 (node 1), as each rank logged it
    (`rank R/N: node K (HOST), local rank L/M`), at every start."""
    hosts = node_hostnames()
    want = {0: hosts["n1"], 1: hosts["n1"], 2: hosts["n2"], 3: hosts["n2"]}
    for rank, host in want.items():
        log = (run_dir / "logs" / f"rank{rank}.log").read_text()
        seen = re.findall(r"\[rank \d+\] INFO hpcllm: rank (\d+)/4: node (\d+) \((\S+)\), local rank (\d+)/(\d+)", log)
        assert seen == [(str(rank), str(rank // 2), host, str(rank % 2), "2")] * starts, (rank, seen, want)


def train_spec(root: Path, name: str, backend: str = "mpi", *, steps: int = UNION_STEP, nodes: int = 2,
               tasks: int = 2, batch: int = 2) -> dict:
    # min_lr == lr: a constant learning rate after warmup, so step 20 of a long run is step 20 of a short one;
    # log_interval 1: the loss of every step is in metrics.jsonl (a logged mean would straddle a stop)
    return {"kind": "train", "name": name, "run_dir": str(root / name), "data": {"dataset": str(root / "ds")},
            "dist": {"backend": backend, "timeout_s": 90, "bucket_mb": 0.05},
            "model": {"size": "custom", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 64},
            "train": {"max_steps": steps, "batch_size": batch, "seq_len": 32, "lr": 3e-3, "min_lr": 3e-3,
                      "warmup_steps": 2, "eval_interval": 0, "log_interval": 1, "ckpt_interval": 20,
                      "keep_checkpoints": 100, "progress": False},
            "slurm": {"nodes": nodes, "tasks_per_node": tasks, "time": "00:10:00", "max_requeues": 3}}


def weights(run_dir: Path, step: int) -> dict:
    from hpcllm.checkpoint import read_checkpoint_model as load_file

    return load_file(run_dir / "checkpoints" / f"step_{step:08d}")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    require_slurm(two_node=True)
    root = tmp_path_factory.mktemp("two_node")
    corpus = root / "corpus"
    corpus.mkdir()
    import email

    for p in sorted(Path(email.__file__).parent.glob("*.py")):  # real text: a few hundred KB of Python
        (corpus / p.name).write_text(p.read_text())
    prep = write_spec(root, {"kind": "prepare", "name": "prep", "run_dir": str(root / "prep"),
                             "data": {"inputs": [str(corpus)], "dataset": str(root / "ds"), "val_fraction": 0.2}})
    p = hpcllm("prepare", str(prep))
    assert p.returncode == 0, p.stderr
    return root


@pytest.fixture(scope="module")
def mpi_job(root):
    """The mpi-backend job to STEPS, submitted first so that it runs while the references train here."""
    spec = train_spec(root, "mpi", "mpi", steps=STEPS)
    return spec, submit(root, spec)


@pytest.fixture(scope="module")
def one_rank(root, mpi_job):
    """1 rank on the union batch (4 x 2), and a control on a single rank's batch (must not match)."""
    specs = [train_spec(root, "one_rank", "single", nodes=1, tasks=1, batch=8),
             train_spec(root, "control", "single", nodes=1, tasks=1, batch=2)]
    procs = [subprocess.Popen([sys.executable, "-m", "hpcllm.cli", "train", str(write_spec(root, s))], cwd=REPO,
                              env=local_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for s in specs]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
    return weights(root / "one_rank", UNION_STEP), weights(root / "control", UNION_STEP)


@pytest.fixture(scope="module")
def uninterrupted_mpi(mpi_job):
    """The finished mpi-backend job: compared at step 20 with one rank, at the end with the requeued job."""
    spec, job = mpi_job
    finish(spec, job)
    return Path(spec["run_dir"])


@pytest.mark.parametrize("backend", ["mpi", "torch", pytest.param("horovod", marks=pytest.mark.horovod)])
def test_training_on_two_nodes_equals_one_rank_on_the_union_batch(root, mpi_job, one_rank, uninterrupted_mpi, backend):
    if backend == "mpi":
        run_dir = uninterrupted_mpi
    else:
        spec = train_spec(root, backend, backend)
        finish(spec, submit(root, spec))
        run_dir = Path(spec["run_dir"])
    assert f"train job '{run_dir.name}': 4 rank(s), backend {backend}" in (run_dir / "logs" / "rank0.log").read_text()
    check_rank_placement(run_dir)
    union, control = one_rank
    got = weights(run_dir, UNION_STEP)
    assert max_diff(got, union) <= ATOL, max_diff(got, union)
    assert max_diff(got, control) > 100 * ATOL  # the tolerance tells a wrong batch apart


def test_dynamic_inference_on_two_nodes_equals_one_process(root):
    from tests.infer.helpers import model_and_prompts, outputs

    lines = [{"id": 500 + i, "prompt": "x = " * (1 + i % 5) + str(i)} for i in range(13)]
    model_and_prompts(root, lines, cli=None, per_shard=2)
    infer = {"model": str(root / "model"), "prompts": str(root / "prompts"), "max_new_tokens": 10,
             "temperature": 0.9, "top_k": 20, "seed": 4, "batch_size": 2, "schedule": "dynamic"}
    spec = {"kind": "infer", "name": "infer2n", "run_dir": str(root / "infer2n"), "infer": infer,
            "slurm": {"nodes": 2, "tasks_per_node": 2, "time": "00:10:00"}}
    job = submit(root, spec)
    ref = hpcllm("infer", str(write_spec(root, {"kind": "infer", "name": "infer1", "run_dir": str(root / "infer1"),
                                                "infer": infer})))
    assert ref.returncode == 0, ref.stderr[-2000:]
    finish(spec, job)
    want = outputs(root / "infer1")
    assert sorted(want) == [500 + i for i in range(13)]
    assert outputs(root / "infer2n") == want
    assert "on 4 rank(s)" in (root / "infer2n" / "logs" / "rank0.log").read_text()
    check_rank_placement(root / "infer2n")


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints (one being written has a temporary name)."""
    d = run_dir / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(int(m[1]) for p in d.iterdir() if (m := re.fullmatch(r"step_(\d+)", p.name)))


def controller_fields(job: int) -> dict:
    out = run(["scontrol", "show", "job", "-o", str(job)], env=ENV).stdout
    return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)


def test_two_node_training_requeued_twice_resumes_exactly(root, uninterrupted_mpi):
    """Start 0 gets the time-limit warning (USR2, as from #SBATCH --signal): it checkpoints and the
    job script requeues it. Start 1 is requeued by `scontrol requeue` (SIGTERM, no warning). Start 2
    finishes. Every start resumes from the last checkpoint; the end equals an uninterrupted run."""
    spec = train_spec(root, "requeued", "mpi", steps=STEPS)
    run_dir = Path(spec["run_dir"])
    job = submit(root, spec)
    try:
        wait_until(lambda: checkpoint_steps(run_dir)[-1:] >= [20], 150, f"job {job}: first checkpoint", 0.2)
        assert run(["scancel", "--signal=USR2", str(job)], env=ENV).returncode == 0
        out = run_dir / "logs" / f"requeued-{job}.out"
        wait_until(lambda: out.exists() and "requeueing job" in out.read_text(), 60, f"job {job}: self-requeue")
        first_stop = checkpoint_steps(run_dir)[-1]
        assert first_stop < STEPS, "the job finished before the warning came"
        wait_until(lambda: checkpoint_steps(run_dir)[-1] > first_stop, 150, f"job {job}: a checkpoint in start 1", 0.2)
        assert controller_fields(job)["Restarts"] == "1"
        assert run(["scontrol", "requeue", str(job)], env=ENV).returncode == 0
        finish(spec, job, 240)
    finally:
        run(["scancel", str(job)], env=ENV)
    assert controller_fields(job)["Restarts"] == "2"
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert f"stopping at step {first_stop} (signal SIGUSR2)" in log, log[-3000:]
    resumed = [int(s) for s in re.findall(r"resumed from \S+ \(step (\d+)\)", log)]
    assert len(resumed) == 2 and resumed[0] == first_stop < resumed[1] < STEPS, resumed
    check_rank_placement(run_dir, starts=3)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in (uninterrupted_mpi / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [m["step"] for m in want] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in metrics] == [m["loss"] for m in want]
    a, b = weights(run_dir, STEPS), weights(uninterrupted_mpi, STEPS)
    assert all(torch.equal(a[k], b[k]) for k in a)
