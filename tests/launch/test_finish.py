"""hpcllm.launch.finish, the batch script's last word on both paths: a step that exited 0 counts only
if the job's results are there (srun exits 0 when its step fails to launch); any other status is
the job's, with one line saying what it means. Real checkpoints, datasets and inference outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpcllm.config import load_spec
from hpcllm.errors import EXIT_REQUEUE
from hpcllm.jobs.kind import get_kind
from hpcllm.launch.finish import decide

REPO = Path(__file__).resolve().parents[2]


def write_spec(tmp_path, body: dict) -> Path:
    p = tmp_path / f"{body['name']}.yaml"
    p.write_text(json.dumps(body))
    return p


def finish(spec_file, status, *args):
    """The module as the batch scripts run it, outside any Slurm job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run([sys.executable, "-m", "hpcllm.launch.finish", str(spec_file), str(status), *args],
                          capture_output=True, text=True, timeout=120, env=env, cwd=REPO)


def test_training_is_complete_only_with_the_checkpoint_of_max_steps(tmp_path):
    import torch

    from hpcllm.checkpoint import save_checkpoint

    spec_file = write_spec(tmp_path, {"kind": "train", "name": "t", "run_dir": str(tmp_path / "run"),
                                      "train": {"max_steps": 300}})
    spec = load_spec(spec_file)
    p = finish(spec_file, 0)
    assert p.returncode == 9 and p.stdout == ""
    assert p.stderr == (f"hpcllm: train job (not under Slurm) did not finish although its step exited 0: no checkpoint "
                        f"of step 300 (train.max_steps) in {tmp_path / 'run'}/checkpoints (no checkpoint at all) (the "
                        "step failed to launch or ended early: see the srun lines above)\n")
    from hpcllm.comm import SingleProcess, detect_world

    comm = SingleProcess(detect_world(), torch.device("cpu"), 10.0)
    state = {"model": {"w": torch.zeros(2)}}
    save_checkpoint(spec.run_dir, 115, comm, state, {}, {"spec": {}}, keep=2)  # the run: step 115 of 300
    code, line = decide(spec, 0, "1234", 0)
    assert code == 9 and "no checkpoint of step 300" in line and "(latest step_00000115)" in line and "job 1234" in line
    torn = Path(spec.run_dir) / "checkpoints" / "step_00000300"
    torn.mkdir()  # a step directory without its parts is not the end of the run
    code, line = decide(spec, 0, "1234", 0)
    assert code == 9 and "(latest step_00000115)" in line
    torn.rmdir()
    save_checkpoint(spec.run_dir, 300, comm, state, {}, {"spec": {}}, keep=2)
    p = finish(spec_file, 0)
    assert (p.returncode, p.stdout, p.stderr) == (0, "hpcllm: train job (not under Slurm): complete\n", "")


def test_a_failed_step_fails_the_job_with_its_status(tmp_path):
    spec_file = write_spec(tmp_path, {"kind": "train", "name": "t", "run_dir": str(tmp_path / "run")})
    for status, meaning in ((5, "bad data"), (137, "a rank was killed by SIGKILL"), (1, "unclassified error"),
                            (77, "not an hpcllm exit status")):
        p = finish(spec_file, status)
        assert p.returncode == status, p.stderr
        assert p.stderr.count("\n") == 1 and f"exited with status {status} ({meaning}" in p.stderr, p.stderr
    # a stopped training job outside Slurm, or past max_requeues, is not requeued: 85 and where to go on from
    p = finish(spec_file, EXIT_REQUEUE)
    assert p.returncode == EXIT_REQUEUE
    assert p.stderr == (f"hpcllm: checkpointed and stopped; not requeued (restart 0, max_requeues 3): submit again to "
                        f"continue from the checkpoint in {tmp_path / 'run'}\n")
    # a job id no cluster has: the local test cluster, shared by the whole suite, may have a job 77
    code, line = decide(load_spec(spec_file, ["slurm.max_requeues=1"]), EXIT_REQUEUE, "4000000077", 1)
    assert code == EXIT_REQUEUE and "not requeued (restart 1, max_requeues 1)" in line
    # a kind that is never requeued: 85 is just a failure
    prep = write_spec(tmp_path, {"kind": "prepare", "name": "p", "data": {"dataset": str(tmp_path / "ds")}})
    assert finish(prep, EXIT_REQUEUE).returncode == EXIT_REQUEUE
    # a spec that cannot be read: one line, and never 0
    p = finish(tmp_path / "missing.yaml", 0)
    assert p.returncode == 2 and p.stderr.startswith("hpcllm: job (not under Slurm): cannot check how it ended: job spec") and \
        p.stderr.count("\n") == 1


def test_prepare_is_complete_with_its_manifest(tmp_path):
    (tmp_path / "c.txt").write_text("some text " * 100)
    spec_file = write_spec(tmp_path, {"kind": "prepare", "name": "p", "run_dir": str(tmp_path / "run"),
                                      "data": {"inputs": [str(tmp_path / "c.txt")], "dataset": str(tmp_path / "ds")}})
    p = finish(spec_file, 0)
    assert p.returncode == 9 and f"no manifest.json in data.dataset {tmp_path / 'ds'}" in p.stderr
    assert subprocess.run([sys.executable, "-m", "hpcllm.cli", "prepare", str(spec_file)], capture_output=True,
                          cwd=REPO).returncode == 0
    assert finish(spec_file, 0).returncode == 0


@pytest.mark.slow
def test_an_inference_array_task_is_complete_with_its_own_shards(tmp_path):
    """Task 0 of 2 done: task 0 is complete, task 1 and the whole job are not; `finish` finds the
    task's share from --array-task/--array-tasks as `hpcllm submit` passes them."""
    from hpcllm.model import ModelConfig, build_model, save_hf_model

    save_hf_model(build_model(ModelConfig(size="custom", n_layer=1, n_head=2, n_embd=32, block_size=64,
                                             vocab_size=258).resolve()).init_weights(1), tmp_path / "model")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"text": f"prompt {i}"}) for i in range(6)) + "\n")
    prep = write_spec(tmp_path, {"kind": "prepare", "name": "pp", "run_dir": str(tmp_path / "pr"), "data": {
        "inputs": [str(tmp_path / "p.jsonl")], "output": "prompts", "prompts_per_shard": 2,
        "dataset": str(tmp_path / "prompts")}})
    assert subprocess.run([sys.executable, "-m", "hpcllm.cli", "prepare", str(prep)], capture_output=True).returncode == 0
    spec_file = write_spec(tmp_path, {"kind": "infer", "name": "inf", "run_dir": str(tmp_path / "inf"), "infer": {
        "model": str(tmp_path / "model"), "prompts": str(tmp_path / "prompts"), "max_new_tokens": 3}})
    task0 = get_kind("infer").array_task_overrides(0, 2)
    r = subprocess.run([sys.executable, "-m", "hpcllm.cli", "infer", str(spec_file), *task0], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert finish(spec_file, 0, "--array-task", "0", "--array-tasks", "2").returncode == 0
    p = finish(spec_file, 0, "--array-task", "1", "--array-tasks", "2")
    assert p.returncode == 9 and "1 prompt shard(s) without output" in p.stderr and "[array task 1 of 2]" in p.stderr
    p = finish(spec_file, 0)
    assert p.returncode == 9 and "1 prompt shard(s) without output" in p.stderr and "prompts-00001.h5" in p.stderr
    # a done shard whose output was damaged in place (same size, one byte flipped) is not done
    out = next((tmp_path / "inf" / "outputs").glob("out-00000*.h5"))
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0xFF
    out.write_bytes(bytes(data))
    p = finish(spec_file, 0, "--array-task", "0", "--array-tasks", "2")
    assert p.returncode == 9 and "1 prompt shard(s) without output" in p.stderr and "prompts-00000.h5" in p.stderr


# the batch script's last word imports no torch: Slurm bills every second of it (importing torch
# alone took 5 s of the 7.9 s it used to take), and the run's records end before it
NO_TORCH = """
import sys
from hpcllm.launch.finish import main
code = main(sys.argv[1:])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print(code, heavy)
"""


def test_finish_imports_no_torch(tmp_path):
    import torch

    from hpcllm.checkpoint.layout import DCP_DIR, METADATA
    from hpcllm.comm import SingleProcess, detect_world
    from hpcllm.data.prepare import prepare_prompts

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    train = write_spec(tmp_path, {"kind": "train", "name": "t", "run_dir": str(tmp_path / "run"),
                                  "train": {"max_steps": 3}})
    final = tmp_path / "run" / "checkpoints" / "step_00000003"
    (final / DCP_DIR).mkdir(parents=True)  # the layout of a whole checkpoint (its contents are not read)
    for f in (final / DCP_DIR / METADATA, final / "state.pt", final / "meta.json"):
        f.write_text("")
    prep = write_spec(tmp_path, {"kind": "prepare", "name": "p", "data": {
        "inputs": [str(tmp_path / "p.jsonl")], "output": "prompts", "prompts_per_shard": 2,
        "dataset": str(tmp_path / "prompts")}})
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"text": f"prompt {i}"}) + "\n" for i in range(4)))
    prepare_prompts(load_spec(prep).data, SingleProcess(detect_world(), torch.device("cpu"), 10.0))  # in this process: fast
    infer = write_spec(tmp_path, {"kind": "infer", "name": "i", "run_dir": str(tmp_path / "inf"), "infer": {
        "model": str(tmp_path / "model"), "prompts": str(tmp_path / "prompts")}})
    for spec, args, code in ((train, ["0"], 0), (prep, ["0"], 0),
                             (infer, ["0", "--array-task", "1", "--array-tasks", "2"], 9)):
        p = subprocess.run([sys.executable, "-c", NO_TORCH, str(spec), *args], capture_output=True, text=True,
                           timeout=60, env=env, cwd=REPO)
        assert p.stdout.splitlines()[-1] == f"{code} []", (spec, p.stdout, p.stderr)
    assert "1 prompt shard(s) without output" in p.stderr and "[array task 1 of 2]" in p.stderr
