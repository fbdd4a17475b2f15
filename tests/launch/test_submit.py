"""`hpcllm submit` through submitit on the local Slurm: a 2-task training job, a chain, a dry run;
a job requeued by Slurm and through its batch shell that ends as an uninterrupted run does;
every spec checked (by hpcllm and by Slurm) before any job is submitted; a failed first stage
cancels the rest of its chain; a job whose restarted step fails to launch fails; array parallelism
across split arrays; the job's own interpreter; overrides anywhere on the command line."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hpcllm.launch.submit import minutes
from tests.slurm_util import mpi_in_background, require_slurm, run, sacct_rows, slurm_env, wait_job, wait_until

REPO = Path(__file__).resolve().parents[2]


def test_minutes():
    assert [minutes(t) for t in ("30", "01:00:00", "1-00:00:00", "00:00:30", "2:30")] == [30, 60, 1440, 1, 3]


def specs(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"{i}.txt").write_text(f"document {i} " + "alpha beta gamma " * (150 + 9 * i))
    prep = {"kind": "prepare", "name": "chain-prep", "run_dir": str(tmp_path / "prep"),
            "data": {"inputs": [str(corpus)], "dataset": str(tmp_path / "ds"), "val_fraction": 0.2},
            "slurm": {"tasks_per_node": 2, "time": "00:03:00"}}
    train = {"kind": "train", "name": "chain-train", "run_dir": str(tmp_path / "train"),
             "data": {"dataset": str(tmp_path / "ds")}, "dist": {"timeout_s": 60},
             "model": {"size": "custom", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 64},
             "train": {"max_steps": 6, "batch_size": 2, "seq_len": 32, "log_interval": 2, "eval_interval": 0,
                       "progress": False},
             "slurm": {"tasks_per_node": 2, "time": "00:03:00"}}
    (tmp_path / "prep.yaml").write_text(json.dumps(prep))
    (tmp_path / "train.yaml").write_text(json.dumps(train))
    return tmp_path / "prep.yaml", tmp_path / "train.yaml"


def hpcllm_submit(*args, env: dict | None = None):
    return subprocess.run([sys.executable, "-m", "hpcllm.cli", "submit", *args], capture_output=True, text=True,
                          env=slurm_env(env), cwd=REPO, timeout=120)


# a job that must still be running when a signal comes: every rank sleeps this long in each step
# (hpcllm.train.stragglers' test hook; the job's ranks inherit it from sbatch's environment). A tiny
# model's step then takes ~25 ms, as a model sized to compute that long did — without its CPU, which
# the rest of the suite needs
SLOW_STEPS = {"HPCLLM_TEST_SLOW_RANK": "*:0.02"}


@pytest.fixture(scope="module")
def prepared_ds(tmp_path_factory):
    """specs()'s dataset, prepared once for the tests that only train on it (training only reads it)."""
    root = tmp_path_factory.mktemp("submit_ds")
    prep, _ = specs(root)
    p = subprocess.run([sys.executable, "-m", "hpcllm.cli", "prepare", str(prep)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return root / "ds"


def train_spec(tmp_path, ds):
    """specs()'s train spec, reading the prepared dataset ds."""
    _, train = specs(tmp_path)
    t = json.loads(train.read_text())
    t["data"]["dataset"] = str(ds)
    train.write_text(json.dumps(t))
    return train


def test_an_override_that_gives_two_specs_one_run_dir_is_refused(tmp_path):
    prep, train = specs(tmp_path)
    p = hpcllm_submit(str(prep), str(train), "--chain", f"run_dir={tmp_path / 'same'}", "--dry-run")
    assert p.returncode == 2, p.stderr
    assert f"{prep} and {train} both have run_dir" in p.stderr and "applies to every spec" in p.stderr
    assert "would submit" not in p.stdout


@pytest.mark.slurm
def test_dry_run_submits_nothing(tmp_path):
    prep, train = specs(tmp_path)
    # options anywhere among the specs and overrides
    p = hpcllm_submit(str(prep), "--chain", str(train), "train.max_steps=7", "--dry-run", "slurm.python=/opt/py/bin/python")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("would submit (dry run, nothing submitted)") == 2
    assert "#SBATCH --ntasks-per-node=2" in p.stdout and "--mpi=pmix" in p.stdout
    assert "#SBATCH --dependency='afterok:<previous job id>'" in p.stdout
    assert p.stdout.count("#SBATCH --kill-on-invalid-dep=yes") == 2
    assert "#SBATCH --signal=USR2@90" in p.stdout  # the default 120 s, cut to half the 3-minute limit
    assert "  max_steps: 7\n" in p.stdout
    # the job's own interpreter runs the tasks and the last word
    assert "--mpi=pmix /opt/py/bin/python -u -m submitit.core._submit" in p.stdout
    assert re.search(r"exec /opt/py/bin/python -m hpcllm.launch.finish \S+/train/submitit/train-spec-\w+\.yaml "
                     r'"\$hpcllm_status"', p.stdout), p.stdout
    assert "# Slurm's own checks (sbatch --test-only) passed" in p.stdout
    assert not (tmp_path / "train").exists() and not (tmp_path / "prep").exists()


@pytest.mark.slurm
def test_chain_prepare_then_train_through_submitit(tmp_path):
    require_slurm()
    prep, train = specs(tmp_path)
    p = hpcllm_submit(str(prep), str(train), "--chain")
    assert p.returncode == 0, p.stderr
    ids = re.findall(r"submitted \w+ job '[^']+' as (\d+)", p.stdout)
    assert len(ids) == 2 and f"(after {ids[0]})" in p.stdout
    assert wait_job(ids[0], 120) == "COMPLETED"
    assert wait_job(ids[1], 180) == "COMPLETED", list((tmp_path / "train" / "submitit").rglob("*.err"))
    assert (tmp_path / "ds" / "manifest.json").exists()
    assert (tmp_path / "train" / "checkpoints" / "step_00000006" / "dcp" / ".metadata").exists()
    steps = [json.loads(x)["step"] for x in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]
    start = run(["sacct", "-X", "-n", "-P", "-j", ids[1], "-o", "Start"]).stdout.strip()
    end = run(["sacct", "-X", "-n", "-P", "-j", ids[0], "-o", "End"]).stdout.strip()
    assert start >= end  # ISO timestamps: the train job started after prepare ended
    assert {r["State"] for r in sacct_rows(ids[1])} == {"COMPLETED"}
    log = (tmp_path / "train" / "submitit" / ids[1] / f"{ids[1]}_0_log.err").read_text()
    assert "2 rank(s), backend mpi" in log
    # hpcllm jobs / logs
    j = subprocess.run([sys.executable, "-m", "hpcllm.cli", "jobs", str(tmp_path / "prep"), str(tmp_path / "train")],
                       capture_output=True, text=True, env=slurm_env())
    assert j.returncode == 0, j.stderr
    lines = {line.split()[0]: line.split() for line in j.stdout.splitlines()[1:]}
    assert lines[ids[0]][1:2] == ["prepare"] and "COMPLETED" in lines[ids[0]]
    assert lines[ids[1]][1:2] == ["train"] and "COMPLETED" in lines[ids[1]]
    lg = subprocess.run([sys.executable, "-m", "hpcllm.cli", "logs", ids[1], str(tmp_path / "train"), "--err"],
                        capture_output=True, text=True)
    assert lg.returncode == 0 and "2 rank(s), backend mpi" in lg.stdout
    lg = subprocess.run([sys.executable, "-m", "hpcllm.cli", "logs", ids[1], str(tmp_path / "train"), "--rank", "7"],
                        capture_output=True, text=True)
    assert lg.returncode == 1 and "rank 7 does not exist" in lg.stderr


@pytest.mark.slurm
def test_inference_job_array_with_a_failed_task_retried(tmp_path):
    """5 prompt shards over 3 array tasks; one shard is corrupt at first, so its task fails and no
    output manifest is written; after the shard is repaired, resubmitting finishes only what is left,
    and the outputs equal a single-process run."""
    require_slurm()
    import shutil

    from hpcllm.model import ModelConfig, build_model, save_hf_model
    from tests.infer.test_job import outputs

    save_hf_model(build_model(ModelConfig(size="custom", n_layer=1, n_head=2, n_embd=32, block_size=64,
                                             vocab_size=258).resolve()).init_weights(1), tmp_path / "model")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"id": i, "text": f"prompt {i} " * (1 + i % 3)})
                                                for i in range(10)) + "\n")
    (tmp_path / "prep.yaml").write_text(json.dumps({"kind": "prepare", "run_dir": str(tmp_path / "pr"), "data": {
        "inputs": [str(tmp_path / "p.jsonl")], "output": "prompts", "id_field": "id", "prompts_per_shard": 2,
        "dataset": str(tmp_path / "prompts")}}))
    assert subprocess.run([sys.executable, "-m", "hpcllm.cli", "prepare", str(tmp_path / "prep.yaml")],
                          capture_output=True).returncode == 0
    infer = {"mode": "generate", "model": str(tmp_path / "model"), "prompts": str(tmp_path / "prompts"),
             "max_new_tokens": 6, "temperature": 0.7, "seed": 2, "batch_size": 4}
    (tmp_path / "ref.yaml").write_text(json.dumps({"kind": "infer", "name": "ref", "run_dir": str(tmp_path / "ref"),
                                                   "infer": infer}))
    assert subprocess.run([sys.executable, "-m", "hpcllm.cli", "infer", str(tmp_path / "ref.yaml")],
                          capture_output=True).returncode == 0
    spec = tmp_path / "arr.yaml"
    spec.write_text(json.dumps({"kind": "infer", "name": "arr", "run_dir": str(tmp_path / "arr"), "infer": infer,
                                "slurm": {"array_tasks": 3, "array_parallelism": 2, "time": "00:03:00"}}))
    shard = tmp_path / "prompts" / "prompts-00001.h5"
    good = shard.read_bytes()
    shutil.copy(shard, tmp_path / "keep.h5")
    shard.write_bytes(good[:300] + b"\0" * (len(good) - 300))  # same size, corrupt content
    p = hpcllm_submit(str(spec))
    assert p.returncode == 0, p.stderr
    job = re.findall(r"as (\d+) \(3 array tasks\)", p.stdout)[0]
    states = {i: wait_job(f"{job}_{i}", 120) for i in range(3)}
    assert states == {0: "COMPLETED", 1: "FAILED", 2: "COMPLETED"}, states
    out = tmp_path / "arr" / "outputs"
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.glob("*.done")) == ["out-00000.h5.done", "out-00002.h5.done",
                                                          "out-00003.h5.done"]
    shard.write_bytes(good)  # repaired: retry
    p = hpcllm_submit(str(spec))
    job = re.findall(r"as (\d+) \(3 array tasks\)", p.stdout)[0]
    assert all(wait_job(f"{job}_{i}", 120) == "COMPLETED" for i in range(3))
    assert (out / "manifest.json").exists()
    assert outputs(tmp_path / "arr") == outputs(tmp_path / "ref")


@pytest.mark.slurm
def test_debug_prints_and_runs_the_job_interactively(tmp_path, prepared_ds):
    """The printed and the run commands carry the overrides: the job debugged is the job asked for."""
    require_slurm()
    train = train_spec(tmp_path, prepared_ds)
    overrides = ["train.max_steps=3", f"run_dir={tmp_path}/dbg"]
    p = subprocess.run([sys.executable, "-m", "hpcllm.cli", "debug", str(train), *overrides], capture_output=True,
                       text=True)
    assert p.returncode == 0
    assert "salloc --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --time=00:03:00" in p.stdout
    assert "--pty" in p.stdout and "-m pdb" in p.stdout and "HPCLLM_LOG_LEVEL=debug srun --mpi=pmix" in p.stdout
    job_lines = [line for line in p.stdout.splitlines() if line.endswith(f"train {train} {' '.join(overrides)}")]
    assert len(job_lines) == 2, p.stdout  # the whole job and the one rank under pdb
    assert f"tail -f {tmp_path}/dbg/logs/rank*.log" in p.stdout
    r = subprocess.run([sys.executable, "-m", "hpcllm.cli", "debug", str(train), "--run", *overrides],
                       capture_output=True, text=True, env=slurm_env(), cwd=REPO, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [c.name for c in (tmp_path / "dbg" / "checkpoints").iterdir()] == ["step_00000003"]
    assert not (tmp_path / "train").exists()


def test_preflight_fails_fast_on_missing_inputs(tmp_path):
    _, train = specs(tmp_path)
    p = subprocess.run([sys.executable, "-m", "hpcllm.cli", "train", str(train)], capture_output=True, text=True)
    assert p.returncode == 10 and "data.dataset:" in p.stderr and "does not exist" in p.stderr


def requeue_after_its_first_checkpoint(job: str, run_dir: Path) -> None:
    """`scontrol requeue` (Slurm's SIGTERM, then a restart) once the job has written a checkpoint."""
    ckpts = run_dir / "checkpoints"
    wait_until(lambda: ckpts.exists() and any(ckpts.iterdir()), 120, f"job {job}: a first checkpoint")
    assert run(["scontrol", "requeue", job]).returncode == 0


@pytest.mark.slurm
def test_cancel_and_hard_requeue_of_a_submitted_training_job(tmp_path, prepared_ds):
    """scontrol requeue (Slurm's SIGTERM, the job killed after KillWait if it lingers), then USR2 sent
    to submitit's batch shell only (`scancel --batch`: the shell must pass it on to the ranks, not die
    of it, FAILED 0:12): each start resumes from the last checkpoint, and the job still ends with the
    parameters of an uninterrupted run. scancel ends a job as CANCELLED."""
    require_slurm()
    import time

    from hpcllm.checkpoint import read_checkpoint_model as load_file

    train = train_spec(tmp_path, prepared_ds)
    t = json.loads(train.read_text())
    # ~25 ms a step (SLOW_STEPS): the batch-shell signal is sent once the second start has logged 30
    # steps (resumed at ~50-70, so at step ~80-100) and lands within ~1 s; 300 steps leave ~5 s of
    # training after it. At full speed the tiny model ran 1500 steps in ~4 s and sometimes finished
    # before the signal came; a signal after the end fails the test
    t["train"].update(max_steps=300, log_interval=1, ckpt_interval=50)
    t["slurm"]["time"] = "00:05:00"
    ref = dict(t, name="ref", run_dir=str(tmp_path / "ref"))
    (tmp_path / "ref.yaml").write_text(json.dumps(ref))
    train.write_text(json.dumps(t))
    metrics, prov = tmp_path / "train" / "metrics.jsonl", tmp_path / "train" / "provenance.jsonl"
    lines = lambda f: f.read_text().count("\n") if f.exists() else 0  # noqa: E731
    starts = lambda: prov.read_text().count('"event": "start"') if prov.exists() else 0  # noqa: E731
    # the uninterrupted reference trains here while the job runs and waits out its requeues (1 thread per
    # rank on the CPU: the load does not change its results)
    with mpi_in_background(2, [sys.executable, "-m", "hpcllm.cli", "train", str(tmp_path / "ref.yaml")],
                           tmp_path / "ref.log") as ref_run:
        job = re.findall(r"as (\d+)", hpcllm_submit(str(train), env=SLOW_STEPS).stdout)[0]
        requeue_after_its_first_checkpoint(job, tmp_path / "train")
        wait_until(lambda: starts() == 2, 120, f"job {job}: its second start", poll_s=0.1)
        logged = lines(metrics)
        wait_until(lambda: lines(metrics) >= logged + 30, 120, f"job {job}: 30 steps of its second start", poll_s=0.1)
        assert run(["scancel", "--batch", "--signal=USR2", job]).returncode == 0
        assert wait_job(job, 240) == "COMPLETED"
        assert ref_run.wait(240) == 0, (tmp_path / "ref.log").read_text()[-2000:]
    logs = tmp_path / "train" / "submitit" / job
    out = (logs / f"{job}_0_log.out").read_text() + (logs / f"{job}_0_log.err").read_text()
    assert "(signal SIGUSR2)" in out and f"checkpointed, requeueing job {job} (restart 1)" in out, out[-3000:]
    assert f"hpcllm: train job {job}: complete" in out
    states = run(["sacct", "-j", job, "-X", "-n", "-D", "-P", "-o", "State"]).stdout.split()
    assert states == ["REQUEUED", "REQUEUED", "COMPLETED"], states
    a = load_file(tmp_path / "ref" / "checkpoints" / "step_00000300")
    b = load_file(tmp_path / "train" / "checkpoints" / "step_00000300")
    assert all((a[k] == b[k]).all() for k in a)
    # cancel
    t["train"]["max_steps"] = 100000
    train.write_text(json.dumps(dict(t, run_dir=str(tmp_path / "long"))))
    job = re.findall(r"as (\d+)", hpcllm_submit(str(train)).stdout)[0]
    deadline = time.time() + 60
    while time.time() < deadline and not (tmp_path / "long" / "metrics.jsonl").exists():
        time.sleep(0.5)
    assert run(["scancel", job]).returncode == 0
    assert wait_job(job, 60) == "CANCELLED"


@pytest.mark.slurm
def test_training_job_stops_before_its_time_limit_requeues_and_resumes(tmp_path, prepared_ds):
    """A real 1-minute time limit: each start trains until end_time_margin_s before SLURM_JOB_END_TIME,
    checkpoints, and requeues itself; the restart resumes from that checkpoint. With max_requeues=1 the
    second stop is not requeued: the job fails with a message saying where to continue from."""
    require_slurm()
    train = train_spec(tmp_path, prepared_ds)
    t = json.loads(train.read_text())
    t["train"].update(max_steps=1_000_000, log_interval=50, ckpt_interval=0, end_time_margin_s=45)
    t["slurm"].update(time="00:01:00", max_requeues=1)
    train.write_text(json.dumps(t))
    # each start trains for ~15 s: sleeping through its steps, not computing them flat out
    job = re.findall(r"as (\d+)", hpcllm_submit(str(train), env=SLOW_STEPS).stdout)[0]
    assert wait_job(job, 150) == "FAILED"
    logs = tmp_path / "train" / "submitit" / job
    out = (logs / f"{job}_0_log.out").read_text() + (logs / f"{job}_0_log.err").read_text()
    # Slurm's USR2 (--signal=USR2@30: the default 120 s cut to half the limit; Slurm may send it up to a
    # minute early, so it comes before our own margin, which is cut to ~30 s before the limit)
    stops = re.findall(r"stopping at step \d+ \((signal SIGUSR2|within 45 s of the Slurm time limit)\)", out)
    assert len(stops) == 2, out[-3000:]
    assert "requeueing job" in out and "resumed from" in out
    assert "not requeued (restart 1, max_requeues 1): submit again" in out and "Traceback" not in out, out[-3000:]
    states = run(["sacct", "-j", job, "-X", "-n", "-D", "-P", "-o", "State"]).stdout.split()
    assert states.count("REQUEUED") == 1, states
    steps = sorted(int(p.name.split("_")[1]) for p in (tmp_path / "train" / "checkpoints").iterdir())
    assert len(steps) == 2 and 0 < steps[0] < steps[1], steps  # the second start went on from the first


def test_the_checked_script_is_the_submitted_script(tmp_path):
    """--dry-run prints and `sbatch --test-only` checks script_text(); submitit writes its own script
    when it submits: they must be the same text (plain job and array)."""
    import shlex

    import submitit

    from hpcllm.launch.submit import plan, script_text, slurm_parameters

    prep, train = specs(tmp_path)
    for pl in plan([str(prep), str(train)], ["slurm.partition=debug", "slurm.mem=1G", "slurm.python=/x/py"], chain=True):
        for tasks, chunk in ((1, range(0, 1)), (7, range(3, 6))):
            pl.tasks = tasks
            ex = submitit.SlurmExecutor(folder=str(pl.folder), python=shlex.quote(pl.python))
            ex.update_parameters(**slurm_parameters(pl, chunk, "afterok:1"))
            if len(chunk) > 1:
                ex.parameters["map_count"] = len(chunk)  # what submitit sets for an array
            assert ex._make_submission_file_text(ex._submitit_command_str, "uid") == script_text(pl, chunk, "afterok:1")
    assert "--array-task \"$((3 + ${SLURM_ARRAY_TASK_ID:-0}))\" --array-tasks 7" in script_text(pl, range(3, 6), None)


def squeue_names(*names: str) -> list[str]:
    return run(["squeue", "-h", "-t", "all", "-n", ",".join(names), "-o", "%i %j"]).stdout.split("\n")[:-1]


def test_submit_checks_every_spec_before_submitting_any(tmp_path):
    """One bad spec at the end of a chain — an input nobody writes, a run_dir that cannot be made or
    that would break out of its #SBATCH line, a name with a newline — is one line and exit 2 before
    anything is submitted or created."""
    prep, train = specs(tmp_path)
    t = json.loads(train.read_text())
    bad = tmp_path / "bad.yaml"
    cases = [
        ({"data": {"dataset": f"{tmp_path}/other"}},
         f"{bad}: data.dataset '{tmp_path}/other' does not exist (no earlier job of the chain writes it)"),
        ({"run_dir": "/proc/1/nope"}, f"{bad}: run_dir '/proc/1/nope' cannot be created or written"),
        ({"run_dir": f"{tmp_path}/a\nb"}, f"run_dir '{tmp_path}/a\\nb' contains a line break"),
        ({"name": "x\n#SBATCH --wrap=evil"}, "name 'x\\n#SBATCH --wrap=evil' contains a line break"),
        ({"slurm": {"extra": ["--comment=a b"]}}, "slurm.extra[0] '--comment=a b' is not a single --option"),
        ({"slurm": {"time": "1h"}}, "time must look like"),
    ]
    for change, expected in cases:
        bad.write_text(json.dumps({**t, "name": "bad", "run_dir": str(tmp_path / "bad"), **change}))
        p = hpcllm_submit(str(prep), str(train), "--chain", str(bad), "train.max_steps=5")
        assert p.returncode == 2 and expected in p.stderr and p.stderr.count("\n") == 1, (change, p.stderr)
        assert p.stdout == "" and "Traceback" not in p.stderr
        assert not any((tmp_path / d).exists() for d in ("prep", "train", "bad")), change
    # train alone: its dataset does not exist, and without --chain nobody writes it first
    p = hpcllm_submit(str(train))
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert f"data.dataset '{t['data']['dataset']}' does not exist (without --chain the jobs run independently" in p.stderr
    # the same one check for render and debug
    bad.write_text(json.dumps({**t, "run_dir": f"{tmp_path}/a\nb"}))
    for cmd in ("render", "debug"):
        p = subprocess.run([sys.executable, "-m", "hpcllm.cli", cmd, str(bad)], capture_output=True, text=True, cwd=REPO)
        assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
        assert f"hpcllm {cmd}: error: run_dir '{tmp_path}/a\\nb' contains a line break" in p.stderr


@pytest.mark.slurm
def test_slurm_refuses_a_spec_of_the_chain_before_any_is_submitted(tmp_path):
    """What only Slurm knows (sbatch --test-only): an unknown partition, GPUs on a node without
    GRES, more CPUs than a node has. The third spec of a chain is refused: none is submitted."""
    require_slurm()
    import uuid

    prep, train = specs(tmp_path)
    names = [f"{n}-{uuid.uuid4().hex[:8]}" for n in ("prep", "train", "refused")]  # the cluster is shared
    prep.write_text(json.dumps(dict(json.loads(prep.read_text()), name=names[0])))
    t = dict(json.loads(train.read_text()), name=names[1])
    train.write_text(json.dumps(t))
    t2 = tmp_path / "train2.yaml"
    cases = {("partition", "nope"): "Slurm refuses the job: invalid partition specified: nope",
             ("gpus_per_node", 1): "Slurm refuses the job: Invalid generic resource (gres) specification",
             ("cpus_per_task", 64): "Slurm refuses the job: allocation failure: More processors requested than "
                                    "permitted [sinfo: partition debug: 1 node(s), 4 CPUs"}
    for (key, value), expected in cases.items():
        t2.write_text(json.dumps(dict(t, name=names[2], run_dir=str(tmp_path / "train2"),
                                      slurm=dict(t["slurm"], **{key: value}))))
        p = hpcllm_submit(str(prep), str(train), str(t2), "--chain")
        assert p.returncode == 2 and expected in p.stderr and p.stderr.count("\n") == 1, p.stderr
        assert p.stderr.startswith(f"hpcllm submit: error: {t2}: ")
        assert p.stdout == "" and squeue_names(*names) == []
        assert not any((tmp_path / d).exists() for d in ("prep", "train", "train2"))


@pytest.mark.slurm
def test_a_failed_first_stage_cancels_the_rest_of_its_chain(tmp_path):
    """prepare fails at run time (one line, exit 5, no submitit traceback); the two jobs after it
    can never start: Slurm cancels them (kill-on-invalid-dep) and `hpcllm jobs` says why."""
    require_slurm()
    prep, train = specs(tmp_path)
    p = json.loads(prep.read_text())
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "broken\n')
    p["data"]["inputs"] = [str(tmp_path / "bad.jsonl")]
    prep.write_text(json.dumps(p))
    t = json.loads(train.read_text())
    train2 = tmp_path / "train2.yaml"
    train2.write_text(json.dumps(dict(t, name="chain-train2", run_dir=str(tmp_path / "train2"))))
    r = hpcllm_submit(str(prep), str(train), str(train2), "--chain")
    assert r.returncode == 0, r.stderr
    ids = re.findall(r"submitted \w+ job '[^']+' as (\d+)", r.stdout)
    assert len(ids) == 3
    try:
        assert wait_job(ids[0], 120) == "FAILED"
        assert wait_job(ids[1], 60) == "CANCELLED" and wait_job(ids[2], 60) == "CANCELLED"
    finally:
        run(["scancel", *ids])
    err = (tmp_path / "prep" / "submitit" / ids[0] / f"{ids[0]}_0_log.err").read_text()
    assert "Traceback" not in err, err[-3000:]
    assert re.search(rf"hpcllm prepare: error \(rank \d\): {tmp_path}/bad.jsonl:2: ", err), err[-3000:]
    assert f"hpcllm: prepare job {ids[0]} failed: its step exited with status 5 (bad data)" in err
    j = subprocess.run([sys.executable, "-m", "hpcllm.cli", "jobs", str(tmp_path / "prep"), str(tmp_path / "train"),
                        str(tmp_path / "train2")], capture_output=True, text=True, env=slurm_env())
    rows = {line.split()[0]: line for line in j.stdout.splitlines()[1:]}
    assert "FAILED" in rows[ids[0]] and "exit 5: bad data" in rows[ids[0]], j.stdout
    for jid in ids[1:]:
        assert "CANCELLED" in rows[jid] and "DependencyNeverSatisfied: a job it depends on failed" in rows[jid], j.stdout


@pytest.mark.slurm
def test_a_restarted_job_whose_step_fails_to_launch_fails(tmp_path, prepared_ds):
    """The issue's run: `scontrol requeue` mid-run, and the restarted job's step fails to launch. srun
    says 0 then; the job must end FAILED with exit 9 and say where it stopped — not COMPLETED 0:0 at
    step 115 of 300. (The step fails here through a PMIx directory that cannot be created, set only
    on the restart: the same failure as a leftover PMIx socket, without depending on that bug.)"""
    require_slurm()
    train = train_spec(tmp_path, prepared_ds)
    t = json.loads(train.read_text())
    t["train"].update(max_steps=100000, log_interval=1, ckpt_interval=20)
    t["slurm"]["setup"] = ['if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then export SLURM_PMIX_TMPDIR=/nonexistent/pmix; fi']
    train.write_text(json.dumps(t))
    job = re.findall(r"as (\d+)", hpcllm_submit(str(train)).stdout)[0]
    requeue_after_its_first_checkpoint(job, tmp_path / "train")
    try:
        assert wait_job(job, 240) == "FAILED"
    finally:
        run(["scancel", job])
    rows = [r for r in sacct_rows(job) if r["JobID"] == job]
    assert rows[0]["ExitCode"] == "9:0", rows
    err = (tmp_path / "train" / "submitit" / job / f"{job}_0_log.err").read_text()
    assert "launch failed" in err
    latest = sorted(p.name for p in (tmp_path / "train" / "checkpoints").iterdir())[-1]
    assert (f"hpcllm: train job {job} did not finish although its step exited 0: no checkpoint of step 100000 "
            f"(train.max_steps) in {tmp_path / 'train'}/checkpoints (latest {latest})") in err, err[-3000:]
    j = subprocess.run([sys.executable, "-m", "hpcllm.cli", "jobs", str(tmp_path / "train")], capture_output=True,
                       text=True, env=slurm_env())
    assert "FAILED" in j.stdout and "exit 9: job did not finish" in j.stdout, j.stdout


@pytest.mark.slurm
def test_array_parallelism_holds_for_the_whole_job_when_it_is_split(tmp_path, monkeypatch, capsys):
    """5 array tasks, at most 2 at once, split into arrays of 2 (as above MaxArraySize): the arrays run
    one after the other, so never more than 2 tasks run at once; the outputs are complete. The dry
    run shows each array's --array line."""
    require_slurm()
    from hpcllm.launch.submit import submit
    from hpcllm.model import ModelConfig, build_model, save_hf_model

    save_hf_model(build_model(ModelConfig(size="custom", n_layer=1, n_head=2, n_embd=32, block_size=64,
                                             vocab_size=258).resolve()).init_weights(1), tmp_path / "model")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"text": f"prompt {i}"}) for i in range(10)) + "\n")
    (tmp_path / "prep.yaml").write_text(json.dumps({"kind": "prepare", "run_dir": str(tmp_path / "pr"), "data": {
        "inputs": [str(tmp_path / "p.jsonl")], "output": "prompts", "prompts_per_shard": 2,
        "dataset": str(tmp_path / "prompts")}}))
    assert subprocess.run([sys.executable, "-m", "hpcllm.cli", "prepare", str(tmp_path / "prep.yaml")],
                          capture_output=True).returncode == 0
    spec = tmp_path / "arr.yaml"
    spec.write_text(json.dumps({"kind": "infer", "name": "split", "run_dir": str(tmp_path / "arr"),
                                "infer": {"model": str(tmp_path / "model"), "prompts": str(tmp_path / "prompts"),
                                          "max_new_tokens": 4},
                                "slurm": {"array_tasks": 5, "array_parallelism": 2, "time": "00:03:00"}}))
    p = hpcllm_submit(str(spec), "--dry-run")
    assert p.returncode == 0 and "#SBATCH --array=0-4%2" in p.stdout, p.stderr
    monkeypatch.setenv("SLURM_CONF", slurm_env()["SLURM_CONF"])
    submit([str(spec)], [], dry_run=True, max_array=2)
    out = capsys.readouterr().out
    assert out.count("#SBATCH --array=0-1%2") == 2 and out.count("#SBATCH --array") == 2  # the 5th: a plain job
    assert out.count("#SBATCH --dependency='afterany:<previous array job id>'") == 2
    ids = submit([str(spec)], [], max_array=2)
    assert len(ids) == 3
    try:
        states = {}
        for jid in ids:
            tasks = [jid] if jid == ids[-1] else [f"{jid}_0", f"{jid}_1"]
            states.update({t: wait_job(t, 180) for t in tasks})
    finally:
        run(["scancel", *ids])
    assert set(states.values()) == {"COMPLETED"}, states
    assert (tmp_path / "arr" / "outputs" / "manifest.json").exists()
    # never more than 2 running at once: sacct's start and end of every task
    spans = []
    for jid in ids:
        for r in sacct_rows(jid, "JobID,Start,End"):
            if "." not in r["JobID"]:
                spans.append((r["Start"], r["End"]))
    assert len(spans) == 5, spans
    most = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert most <= 2, sorted(spans)


@pytest.mark.slurm
def test_submit_runs_the_jobs_own_interpreter(tmp_path):
    """slurm.python is what runs the tasks (and the last word), as in the rendered scripts."""
    require_slurm()
    prep, _ = specs(tmp_path)
    wrapper = tmp_path / "py"
    wrapper.write_text(f'#!/bin/bash\necho "$$ $*" >> {tmp_path}/wrapper-ran\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    p = hpcllm_submit(str(prep), f"slurm.python={wrapper}")
    assert p.returncode == 0, p.stderr
    job = re.findall(r"as (\d+)", p.stdout)[0]
    assert wait_job(job, 120) == "COMPLETED"
    ran = (tmp_path / "wrapper-ran").read_text().splitlines()
    assert sum("-m submitit.core._submit" in line for line in ran) == 2, ran  # both tasks
    assert sum("-m hpcllm.launch.finish" in line for line in ran) == 1, ran


@pytest.mark.slurm
def test_a_submission_that_fails_half_way_cancels_what_it_submitted(tmp_path):
    """The second job cannot be submitted after the first was (its run_dir holds a file where the
    submitit folder goes): the first is cancelled again and the error is one line."""
    require_slurm()
    prep, _ = specs(tmp_path)
    prep2 = tmp_path / "prep2.yaml"
    prep2.write_text(json.dumps(dict(json.loads(prep.read_text()), name="prep2", run_dir=str(tmp_path / "prep2"))))
    (tmp_path / "prep2").mkdir()
    (tmp_path / "prep2" / "submitit").write_text("not a directory")
    r = hpcllm_submit(str(prep), str(prep2))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    first = re.findall(r"submitted prepare job 'chain-prep' as (\d+)", r.stdout)
    assert len(first) == 1, r.stdout
    assert r.stderr.startswith(f"hpcllm submit: error: {prep2}: submission failed: ")
    assert r.stderr.endswith(f"File exists: '{tmp_path}/prep2/submitit' (cancelled the jobs it had submitted "
                             f"({first[0]}))\n"), r.stderr
    assert wait_job(first[0], 60) == "CANCELLED"


@pytest.mark.slurm
def test_a_cancelled_job_resubmitted_on_fewer_tasks_continues_the_run(tmp_path, prepared_ds):
    """Preempted on 2 tasks, resubmitted to a 1-task allocation with the same run_dir: train.global_batch_size
    keeps the optimisation the same (1 task x 2 micro-steps), the checkpoint's parts load on 1 rank, and
    the run ends where an uninterrupted 2-rank run does."""
    require_slurm()
    import time

    import torch

    from hpcllm.checkpoint import read_checkpoint_model

    train = train_spec(tmp_path, prepared_ds)
    t = json.loads(train.read_text())
    # ~25 ms a step (SLOW_STEPS): the cancel is sent once the step-20 checkpoint is there and lands within
    # ~1 s (~30 steps): 240 steps leave several seconds of margin; a cancel after the end would leave
    # nothing to resume (asserted)
    t["train"].update(max_steps=240, batch_size=2, global_batch_size=4, log_interval=1, ckpt_interval=20,
                      keep_checkpoints=2)
    t["slurm"]["time"] = "00:05:00"
    (tmp_path / "ref.yaml").write_text(json.dumps(dict(t, name="ref", run_dir=str(tmp_path / "ref"))))
    train.write_text(json.dumps(t))
    # the uninterrupted 2-rank reference trains here meanwhile (1 thread per rank: exact under any load)
    with mpi_in_background(2, [sys.executable, "-m", "hpcllm.cli", "train", str(tmp_path / "ref.yaml")],
                           tmp_path / "ref.log") as ref_run:
        job = re.findall(r"as (\d+)", hpcllm_submit(str(train), env=SLOW_STEPS).stdout)[0]
        ckpts = tmp_path / "train" / "checkpoints"
        deadline = time.time() + 120
        while time.time() < deadline and not (ckpts.exists() and any(p.name.startswith("step_") and
                                                                     not p.name.endswith(".tmp") for p in ckpts.iterdir())):
            time.sleep(0.2)
        assert run(["scancel", job]).returncode == 0
        assert wait_job(job, 60) == "CANCELLED"
        job = re.findall(r"as (\d+)", hpcllm_submit(str(train), "slurm.tasks_per_node=1").stdout)[0]
        assert wait_job(job, 240) == "COMPLETED"
        assert ref_run.wait(240) == 0, (tmp_path / "ref.log").read_text()[-2000:]
    logs = tmp_path / "train" / "submitit" / job
    out = (logs / f"{job}_0_log.out").read_text() + (logs / f"{job}_0_log.err").read_text()
    resumed = re.findall(r"resumed step (\d+) from 2 rank\(s\) on 1 rank\(s\)", out)
    assert resumed and 0 < int(resumed[0]) < 240, out[-3000:]
    a = read_checkpoint_model(tmp_path / "ref" / "checkpoints" / "step_00000240")
    b = read_checkpoint_model(ckpts / "step_00000240")
    for k in a:  # two ranks' allreduce vs two micro-steps on one: the same sums in another order
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), (k, (a[k] - b[k]).abs().max().item())
