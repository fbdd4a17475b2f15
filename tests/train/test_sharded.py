"""Sharded and elastic training (parallel.shard, train.global_batch_size, sharded checkpoints), end to
end through the CLI on real ranks: every mode on every backend that carries it gives the losses and
weights of one rank with the union batch; a checkpoint resumes on another number of ranks and in
another mode and continues the uninterrupted run; damaged checkpoints are refused or skipped."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.mpi_util import run_mpi

pytestmark = pytest.mark.mpi

# 10 steps, checkpoints at 5 and 10 (as the pipeline tests' interleaved runs have always had): warmup
# is steps 1-2 and steps 3-10 decay, and the gradient norm of both models on this corpus is 1.5-3.9
# in each of steps 1-10 (measured), above grad_clip 0.5: clipping scales every step. A resumed run
# loads step 5 and takes 5 steps on the restored AdamW moments, LR step and data position, and its
# losses and final weights must equal the uninterrupted run's, so a resume that loses or misplaces
# any of them fails as it did with 20 steps (the parity checks are per step, to RTOL).
STEPS = 10
MID = STEPS // 2  # the checkpoint a resumed run starts from
RTOL = 1e-5
GLOBAL = 6  # sequences per step: 1 rank x 6, 2 ranks x 3, 3 ranks x 2 (or x 1 with accumulation)
LLAMA = {"arch": "llama", "size": "custom", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 40, "ffn_dim": 72,
         "block_size": 64}  # 40 and 72 rows do not split evenly over 3 ranks: the short chunks are exercised
GPT = {"size": "custom", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64}  # tied embeddings, biases


def spec_file(root: Path, dataset, name: str, model: dict, *, shard="none", backend="mpi", batch=None, tp=1,
              **train) -> Path:
    t = {"max_steps": STEPS, "global_batch_size": GLOBAL, "batch_size": batch or GLOBAL, "seq_len": 32, "lr": 3e-3,
         "warmup_steps": 2, "eval_interval": 0, "log_interval": 1, "ckpt_interval": MID, "keep_checkpoints": 5,
         "grad_clip": 0.5, "progress": False, **train}
    spec = {"kind": "train", "name": name, "run_dir": str(root / name), "data": {"dataset": str(dataset)},
            "dist": {"timeout_s": 60, "bucket_mb": 0.02, "backend": backend}, "model": model, "train": t,
            "parallel": {"shard": shard, "tp": tp}}
    p = root / f"{name}.yaml"
    p.write_text(json.dumps(spec))
    return p


def train(spec: Path, n: int, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hpcllm.cli", "train", str(spec), *overrides]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240) if n == 1 else run_mpi(n, cmd, timeout=240)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    from hpcllm.checkpoint import read_checkpoint_model

    return read_checkpoint_model(run_dir / "checkpoints" / f"step_{step:08d}")


def assert_same_run(run: Path, ref: Path, steps: int = STEPS) -> None:
    got, want = metrics(run), metrics(ref)
    assert [m["step"] for m in got] == [m["step"] for m in want] == list(range(1, steps + 1))
    for g, w in zip(got, want):
        assert abs(g["loss"] - w["loss"]) <= RTOL * abs(w["loss"]), (run.name, g["step"], g["loss"], w["loss"])
    a, b = weights(run, steps), weights(ref, steps)
    assert a.keys() == b.keys()
    for k in a:  # relative to the tensor's norm (absolute below norm 1: a bias near zero has no scale of its own)
        err = ((a[k] - b[k]).norm() / max(b[k].norm().item(), 1.0)).item()
        assert err <= RTOL, (run.name, k, err, (a[k] - b[k]).abs().max().item())


def resume_copy(src: Path, dst: Path, at: int = MID) -> None:
    """A run interrupted after its checkpoint of step `at`: the later checkpoints gone."""
    shutil.copytree(src, dst)
    for c in (dst / "checkpoints").iterdir():
        if int(c.name.split("_")[1]) > at:
            shutil.rmtree(c)


@pytest.mark.parametrize("n,shard,backend", [(2, "none", "mpi"), (2, "optimizer", "mpi"), (2, "optimizer", "torch"),
                                             (2, "optimizer", "horovod"), (2, "full", "torch"),
                                             (3, "optimizer", "mpi"), (3, "full", "torch")])
def test_every_mode_equals_one_rank_with_the_union_batch(tmp_path, dataset, references, n, shard, backend):
    if backend == "horovod":
        pytest.importorskip("horovod.torch")
    name = f"{shard}-{backend}-{n}"
    p = train(spec_file(tmp_path, dataset, name, LLAMA, shard=shard, backend=backend, batch=GLOBAL // n), n)
    assert_same_run(tmp_path / name, references / "llama")
    assert f"parallel.shard={shard}" in p.stderr
    mem = metrics(tmp_path / name)[-1]
    one = metrics(references / "llama")[-1]
    assert mem["params_bytes"] > 0 and mem["optimizer_bytes"] > 0 and mem["peak_bytes"] > 0
    if shard == "none":
        assert mem["optimizer_bytes"] == one["optimizer_bytes"]
    else:  # 1/n of AdamW's moments (plus each parameter's step counter), the chunks rounded up
        assert mem["optimizer_bytes"] <= one["optimizer_bytes"] / n * 1.1 + 4096, (mem, one)
    if shard == "full":
        assert mem["params_bytes"] <= one["params_bytes"] / n * 1.1 + 4096


def test_resume_on_another_number_of_ranks_and_in_another_mode(tmp_path, dataset, references):
    """5 steps on 2 ranks, then on 1 and on 3; none -> full, full -> optimizer: each continues the
    uninterrupted run. The full-mode checkpoint is the none -> full run's own step 6 (it checkpoints
    every 3 steps: 6, 9 and the last), not a full-mode run of its own. (A 1-rank checkpoint on more
    ranks: tests/train/test_tensor_parallel.py and test_pipeline.py resume the references'.)"""
    ref = references / "gpt"
    two = tmp_path / "two"
    train(spec_file(tmp_path, dataset, "two", GPT, batch=1), 2)  # 2 ranks x 1 x 3 micro-steps
    assert_same_run(two, ref)
    cases = [("on1", two, 1, "single", "none", 6), ("on3", two, 3, "mpi", "none", 1),
             ("tofull", two, 2, "torch", "full", 3)]
    for name, src, n, backend, shard, batch in cases:
        resume_copy(src, tmp_path / name)
        extra = {"ckpt_interval": 3} if shard == "full" else {}
        p = train(spec_file(tmp_path, dataset, name, GPT, shard=shard, backend=backend, batch=batch, **extra), n)
        old_n = 1 if src == ref else 2
        if old_n != n or shard != "none":
            assert f"resumed step {MID} from {old_n} rank(s) on {n} rank(s) (parallel.shard none -> {shard})" \
                in p.stderr
        assert_same_run(tmp_path / name, ref)
    # full -> optimizer: the full-mode step-6 checkpoint (its parts DTensor shards) on 3 ranks in ZeRO-1
    assert (tmp_path / "tofull" / "checkpoints" / "step_00000006").is_dir()
    resume_copy(tmp_path / "tofull", tmp_path / "tozero", at=6)
    p = train(spec_file(tmp_path, dataset, "tozero", GPT, shard="optimizer", batch=2), 3)
    assert "resumed step 6 from 2 rank(s) on 3 rank(s) (parallel.shard full -> optimizer)" in p.stderr
    assert_same_run(tmp_path / "tozero", ref)


def test_bad_global_batch_and_backend_are_config_errors(tmp_path, dataset):
    spec = spec_file(tmp_path, dataset, "bad", GPT, batch=4)
    p = run_mpi(2, [sys.executable, "-m", "hpcllm.cli", "train", str(spec)])
    assert p.returncode != 0 and "global_batch_size=6 is not a multiple of 2 data-parallel rank(s) x train.batch_size=4" in p.stderr
    assert "Traceback" not in p.stderr
    spec = spec_file(tmp_path, dataset, "bad2", GPT, shard="full", backend="mpi")
    p = subprocess.run([sys.executable, "-m", "hpcllm.cli", "train", str(spec)], capture_output=True, text=True)
    assert p.returncode == 2 and "parallel.shard=full needs dist.backend torch" in p.stderr, p.stderr[-2000:]


def test_damaged_checkpoints_are_refused_or_skipped(tmp_path, dataset):
    spec = spec_file(tmp_path, dataset, "dmg", GPT, batch=3, max_steps=10, ckpt_interval=5)
    train(spec, 2)
    run = tmp_path / "dmg"
    # a missing rank part: an error naming the file, never a partial load
    part = sorted((run / "checkpoints" / "step_00000010" / "dcp").glob("*.distcp"))
    assert len(part) == 2  # every rank wrote its own part
    hidden = part[1].with_name("hidden")
    part[1].rename(hidden)
    p = run_mpi(2, [sys.executable, "-m", "hpcllm.cli", "train", str(spec), "train.max_steps=12"])
    assert p.returncode == 6 and f"{part[1]}: missing" in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
    hidden.rename(part[1])
    # a torn step (its index missing): the previous complete step, with a warning
    (run / "checkpoints" / "step_00000010" / "dcp" / ".metadata").unlink()
    p = train(spec, 2, "train.max_steps=12")
    assert "step_00000010 is incomplete" in p.stderr and "resumed from" in p.stderr and "(step 5)" in p.stderr
    assert [m["step"] for m in metrics(run)] == list(range(1, 13))
