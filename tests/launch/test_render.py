"""sbatch templates: golden files, no shell injection through spec values, and the rendered scripts
really run under sbatch — including a training job that is signalled, checkpoints, requeues itself
and finishes with the same parameters as an uninterrupted run, one signalled through its batch shell,
and one whose step fails to launch (it must fail, not end COMPLETED)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hpcllm.config import load_spec
from hpcllm.errors import ConfigError
from hpcllm.launch.render import render
from tests.disk_util import read_only_dir  # noqa: F401 - a fixture
from tests.slurm_util import (BASE, job_state, mpi_in_background, require_slurm, run, sacct_rows, sbatch, slurm_env,
                              wait_for_logged_steps, wait_job)

GOLDEN = Path(__file__).parent / "golden"
REPO = Path(__file__).resolve().parents[2]

SLURM = {"nodes": 1, "tasks_per_node": 2, "cpus_per_task": 1, "time": "00:05:00", "mem": "2G",
         "partition": "debug", "extra": ["--mail-type=NONE"], "setup": ["echo setting up", "export FOO=bar"],
         "max_requeues": 2, "signal_delay_s": 60}


def make_spec(tmp_path, kind, name="golden", **extra):
    body = {"kind": kind, "name": name, "run_dir": str(tmp_path / "run"), "slurm": {**SLURM, **extra.pop("slurm", {})},
            **extra}
    p = tmp_path / f"{kind}.yaml"
    p.write_text(json.dumps(body))
    return load_spec(p, [f"slurm.python={sys.executable}"]), p


@pytest.mark.parametrize("kind", ["train", "infer", "prepare"])
def test_golden(tmp_path, kind):
    spec, p = make_spec(tmp_path, kind)
    text, spec_file = render(spec, "jobs/golden.yaml")
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    text = text.replace(str(tmp_path), "<TMP>").replace(sys.executable, "<PYTHON>")
    golden = GOLDEN / f"{kind}.sbatch"
    if os.environ.get("HPCLLM_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()
    assert load_spec(spec_file) == spec  # the script runs exactly the resolved spec


def test_values_cannot_inject_commands(tmp_path):
    pwned = tmp_path / "pwned"
    evil = f"x; touch {pwned}; $(touch {pwned}) `touch {pwned}`"
    spec, _ = make_spec(tmp_path, "train", name=evil, slurm={"srun_args": ["--mpi=pmix", f"; touch {pwned}"]})
    text, _ = render(spec)
    # run the script with srun/scontrol replaced by stubs that only print their arguments
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for cmd in ("srun", "scontrol"):
        (stubs / cmd).write_text('#!/bin/bash\nprintf "%s|" "$@"\n')
        (stubs / cmd).chmod(0o755)
    p = subprocess.run(["bash"], input=text, text=True, capture_output=True,
                       env={**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"})
    assert not pwned.exists(), text
    assert "#SBATCH --job-name=x__touch_" in text
    assert f"; touch {pwned}" in p.stdout  # passed to srun as one literal argument
    with pytest.raises(ConfigError, match="name .* line break"):
        render(make_spec(tmp_path, "train", name="a\n#SBATCH --wrap=evil")[0])
    with pytest.raises(ConfigError, match="cannot go onto an #SBATCH line"):
        s, _ = make_spec(tmp_path, "train")
        s.run_dir = str(tmp_path / "a dir; touch x")
        render(s)
    for key, value in (("run_dir", str(tmp_path / "a\n#SBATCH --wrap=evil")), ("slurm.setup", ["ok", "ok\nevil"]),
                       ("slurm.srun_args", ["--x\rz"]), ("slurm.python", "/bin/py\nthon")):
        s, _ = make_spec(tmp_path, "train")
        section, _, field = key.rpartition(".")
        setattr(s.slurm if section else s, field, value)
        with pytest.raises(ConfigError, match=f"{key}.* line break"):
            render(s)
    s, _ = make_spec(tmp_path, "train", slurm={"extra": ["--comment=a b"]})
    with pytest.raises(ConfigError, match=r"slurm.extra\[0\] .* not a single --option"):
        render(s)
    s, _ = make_spec(tmp_path, "train")
    s.run_dir = str(tmp_path / "run%j")  # sbatch would expand it in the log file names
    with pytest.raises(ConfigError, match="cannot go onto an #SBATCH line"):
        render(s)
    with pytest.raises(ConfigError, match="time must look like"):
        make_spec(tmp_path, "train", slurm={"time": "1h; rm"})


def test_render_into_a_read_only_directory_is_one_line(tmp_path, read_only_dir, capsys):
    from hpcllm.cli import main

    _, p = make_spec(tmp_path, "train")
    script = read_only_dir / "job.sbatch"
    assert main(["render", str(p), "-o", str(script)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hpcllm render: error: -o {script}: cannot write the script: ") and err.count("\n") == 1, err
    assert not script.exists()
    assert main(["render", str(p), f"run_dir={read_only_dir / 'run'}"]) == 2  # the spec file goes into the run_dir
    err = capsys.readouterr().err
    assert err.startswith(f"hpcllm render: error: {p}: cannot write the resolved spec {read_only_dir}/run/train-spec"
                          ".yaml (run_dir): ") and err.count("\n") == 1, err


def _train_spec(tmp_path, ds, name, steps):
    return {"kind": "train", "name": name, "run_dir": str(tmp_path / name), "data": {"dataset": str(ds)},
            "dist": {"timeout_s": 60},
            "model": {"size": "custom", "n_layer": 2, "n_head": 2, "n_embd": 128, "block_size": 128},
            "train": {"max_steps": steps, "batch_size": 4, "seq_len": 128, "log_interval": 1, "eval_interval": 0,
                      "ckpt_interval": 0, "progress": False},
            "slurm": {"tasks_per_node": 2, "time": "00:05:00", "max_requeues": 2}}


# ~30 steps/s on 2 ranks here (the model is sized so that a step costs ~30 ms, not tokens; a tiny model
# ran 700 steps/s and sometimes finished before the signal: a flaky test). The signal is sent once 20
# steps are logged (polled every 0.1 s) and has landed at step 25-34 (~0.5 s); 240 steps leave ~7 s of
# training after step 20 at full speed (more when another test loads the machine and steps slow down):
# a signal up to 3 s late (~90 steps) still lands with ~4 s to spare. A signal that came after the end
# fails the test loudly ("checkpointed, requeueing job" is asserted), it cannot pass without a restart.
STEPS = 240


@pytest.mark.slurm
def test_rendered_training_script_requeues_on_signal_and_resumes_exactly(tmp_path, small_ds):
    require_slurm()
    from hpcllm.checkpoint import read_checkpoint_model as load_file

    ds = small_ds
    # reference: the same job on 2 ranks, uninterrupted; it trains here while the Slurm job runs (and waits
    # out its requeue): CPU arithmetic on 1 thread per rank, so its results do not depend on the load
    (tmp_path / "ref.yaml").write_text(json.dumps(_train_spec(tmp_path, ds, "ref", STEPS)))
    with mpi_in_background(2, [sys.executable, "-m", "hpcllm.cli", "train", str(tmp_path / "ref.yaml")],
                           tmp_path / "ref.log") as ref:
        (tmp_path / "job.yaml").write_text(json.dumps(_train_spec(tmp_path, ds, "job", STEPS)))
        script = tmp_path / "job.sbatch"
        r = subprocess.run([sys.executable, "-m", "hpcllm.cli", "render", str(tmp_path / "job.yaml"), "-o",
                            str(script)], capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 0, r.stderr
        job = sbatch(script.read_text(), tmp_path)
        wait_for_logged_steps(tmp_path / "job" / "metrics.jsonl", 20)
        assert job_state(job) == "RUNNING"
        # what Slurm does before the time limit (--signal=USR2@...): signal the job's tasks
        assert run(["scancel", "--signal=USR2", str(job)]).returncode == 0
        state = wait_job(job, 240)
        assert ref.wait(240) == 0, (tmp_path / "ref.log").read_text()[-2000:]
    assert state == "COMPLETED", (tmp_path / "job" / "logs").glob("*")
    log = "".join(p.read_text() for p in (tmp_path / "job" / "logs").glob("*.out"))
    # the signal landed mid-run (a late one, after the last step, has nothing to checkpoint: this fails)
    assert "checkpointed, requeueing job" in log and "resumed from" in log, log[-3000:]
    restarts = run(["sacct", "-j", str(job), "-X", "-n", "-D", "-P", "-o", "State"]).stdout.split()
    assert "REQUEUED" in restarts, restarts
    losses = lambda d: [json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    assert losses("job") == losses("ref")
    a = load_file(tmp_path / "ref" / "checkpoints" / f"step_{STEPS:08d}")
    b = load_file(tmp_path / "job" / "checkpoints" / f"step_{STEPS:08d}")
    assert all((a[k] == b[k]).all() for k in a)


@pytest.mark.slurm
def test_rendered_prepare_and_infer_scripts_run_to_completion(tmp_path):
    require_slurm()
    from hpcllm.model import ModelConfig, build_model, save_hf_model

    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"text": f"prompt number {i}"}) for i in range(6)) + "\n")
    save_hf_model(build_model(ModelConfig(size="custom", n_layer=1, n_head=2, n_embd=32, block_size=64,
                                             vocab_size=258).resolve()).init_weights(0), tmp_path / "model")
    prep = {"kind": "prepare", "name": "rprep", "run_dir": str(tmp_path / "rprep"),
            "data": {"inputs": [str(tmp_path / "p.jsonl")], "output": "prompts", "prompts_per_shard": 2,
                     "dataset": str(tmp_path / "prompts")}, "slurm": {"tasks_per_node": 2, "time": "00:02:00"}}
    inf = {"kind": "infer", "name": "rinfer", "run_dir": str(tmp_path / "rinfer"),
           "infer": {"model": str(tmp_path / "model"), "prompts": str(tmp_path / "prompts"), "max_new_tokens": 4},
           "slurm": {"tasks_per_node": 2, "time": "00:02:00"}}
    for name, spec in (("prep", prep), ("infer", inf)):
        (tmp_path / f"{name}.yaml").write_text(json.dumps(spec))
        out = tmp_path / f"{name}.sbatch"
        r = subprocess.run([sys.executable, "-m", "hpcllm.cli", "render", str(tmp_path / f"{name}.yaml"), "-o", str(out)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        job = sbatch(out.read_text(), tmp_path)
        assert wait_job(job, 120) == "COMPLETED", [p.read_text()[-500:] for p in (tmp_path / spec["run_dir"]).rglob("*.out")]
    assert (tmp_path / "prompts" / "manifest.json").exists()
    man = json.loads((tmp_path / "rinfer" / "outputs" / "manifest.json").read_text())
    assert man["n_records"] == 6 and len(man["shards"]) == 3


def _render_and_sbatch(tmp_path, spec: dict, name: str) -> int:
    (tmp_path / f"{name}.yaml").write_text(json.dumps(spec))
    script = tmp_path / f"{name}.sbatch"
    r = subprocess.run([sys.executable, "-m", "hpcllm.cli", "render", str(tmp_path / f"{name}.yaml"), "-o", str(script)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return sbatch(script.read_text(), tmp_path)


@pytest.mark.slurm
def test_rendered_job_whose_step_fails_to_launch_fails(tmp_path):
    """srun exits 0 when its step is aborted before it has launched (a PMIx client directory that
    cannot be created does it reliably): the job must end FAILED with exit 9 and one line saying
    why, not COMPLETED 0:0 with no work done."""
    require_slurm()
    spec = _train_spec(tmp_path, tmp_path / "ds", "nolaunch", 6)
    spec["slurm"]["setup"] = ["export SLURM_PMIX_TMPDIR=/nonexistent/pmix"]
    job = _render_and_sbatch(tmp_path, spec, "nolaunch")
    assert wait_job(job, 120) == "FAILED"
    rows = {r["JobID"]: r for r in sacct_rows(job)}
    assert rows[str(job)]["ExitCode"] == "9:0", rows
    out = (tmp_path / "nolaunch" / "logs" / f"nolaunch-{job}.out").read_text()
    # srun's "launch failed" line is what the script keys on; its "StepId=... aborted before step
    # completely launched" line comes from another of srun's threads and is sometimes not printed
    assert re.search(r"^srun: error: .*launch failed", out, re.M), out
    line = [x for x in out.splitlines() if x.startswith("hpcllm:")]
    assert line == ["hpcllm: srun did not start the job step; starting it once more, as a new step",
                    f"hpcllm: train job {job} did not finish although its step exited 0: no checkpoint of step 6 "
                    f"(train.max_steps) in {tmp_path / 'nolaunch'}/checkpoints (no checkpoint at all) (the step failed "
                    "to launch or ended early: see the srun lines above)"], out


@pytest.mark.slurm
@pytest.mark.parametrize("path", ["render", "submit"])
def test_a_step_that_did_not_launch_is_started_once_more(tmp_path, small_ds, path):
    """What a requeued job meets when an earlier start left Slurm's PMIx socket of step 0 in the slurmd
    spool (Slurm 22.05 leaves it when a step's set-up fails or its slurmstepd dies, and a requeued
    job numbers its steps from 0 again): the step does not launch ("Address already in use") and
    srun exits 0. The batch script starts it once more — as step 1, with new names — and the job
    trains to the end, on both paths."""
    require_slurm()
    spec = _train_spec(tmp_path, small_ds, "relaunch", 6)
    spec["slurm"]["setup"] = [f'touch {BASE}/spool/stepd.slurm.pmix."$SLURM_JOB_ID".0  # the leftover']
    if path == "render":
        job = _render_and_sbatch(tmp_path, spec, "relaunch")
    else:
        (tmp_path / "relaunch.yaml").write_text(json.dumps(spec))
        p = subprocess.run([sys.executable, "-m", "hpcllm.cli", "submit", str(tmp_path / "relaunch.yaml")],
                           capture_output=True, text=True, cwd=REPO, env=slurm_env(), timeout=120)
        assert p.returncode == 0, p.stderr
        job = int(p.stdout.split(" as ")[1].split()[0].rstrip(":"))
    assert wait_job(job, 180) == "COMPLETED"
    logs = "".join(q.read_text() for q in (tmp_path / "relaunch").rglob("*.err")) + \
        "".join(q.read_text() for q in (tmp_path / "relaunch").rglob("*.out"))
    assert "StepId=" in logs and "aborted before step completely launched" in logs, logs[-3000:]
    assert "srun did not start the job step; starting it once more" in logs
    assert (tmp_path / "relaunch" / "checkpoints" / "step_00000006" / "dcp" / ".metadata").is_file()


@pytest.mark.slurm
def test_signal_to_the_batch_shell_of_a_rendered_job_requeues_it(tmp_path, small_ds):
    """`scancel --batch --signal=USR2` signals the batch shell, not the ranks: the script must pass it
    on (the ranks checkpoint, the job is requeued and finishes) instead of dying of it (FAILED 0:12)."""
    require_slurm()
    job = _render_and_sbatch(tmp_path, _train_spec(tmp_path, small_ds, "batchsig", STEPS), "batchsig")
    wait_for_logged_steps(tmp_path / "batchsig" / "metrics.jsonl", 20)
    assert job_state(job) == "RUNNING"
    assert run(["scancel", "--batch", "--signal=USR2", str(job)]).returncode == 0
    assert wait_job(job, 240) == "COMPLETED"
    log = "".join(p.read_text() for p in (tmp_path / "batchsig" / "logs").glob("*.out"))
    assert "stopping at step" in log and "(signal SIGUSR2)" in log
    assert "checkpointed, requeueing job" in log and "resumed from" in log and f"train job {job}: complete" in log
    states = run(["sacct", "-j", str(job), "-X", "-n", "-D", "-P", "-o", "State"]).stdout.split()
    assert states == ["REQUEUED", "COMPLETED"], states
    assert (tmp_path / "batchsig" / "checkpoints" / f"step_{STEPS:08d}" / "dcp" / ".metadata").exists()
