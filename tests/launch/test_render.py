"""sbatch templates: golden files, no shell injection through spec values, and the rendered scripts
really run under sbatch — prepare and infer to completion, a step that fails to launch (the job
must fail, not end COMPLETED) or launches on the second try. A rendered training job requeued
twice (SIGTERM, and USR2 through its batch shell) and resumed exactly is
tests/report/test_report_slurm.py's first test."""

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
from tests.slurm_util import BASE, require_slurm, sacct_rows, sbatch, slurm_env, wait_job

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
