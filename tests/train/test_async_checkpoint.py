"""train.async_checkpoint: checkpoints written by DCP's async save in the background are the
synchronous ones, bit for bit; a job killed while one is being written resumes exactly from the
last complete one; what is being written is a copy, untouched by the steps that follow."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.mpi_util import mpi_env, mpirun_cmd
from tests.train.test_trainer import dataset, hpcllm, losses, train_spec, weights  # noqa: F401 - dataset: a fixture

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.mpi

_STEPS = dict(max_steps=12, ckpt_interval=4, eval_interval=0, keep_checkpoints=3)


@pytest.fixture(scope="module")
def sync_reference(tmp_path_factory, dataset):  # noqa: F811
    tmp = tmp_path_factory.mktemp("sync")
    p = hpcllm("train", str(train_spec(tmp, dataset, name="sync", **_STEPS)), n=2)
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp / "sync"


def test_background_checkpoints_equal_synchronous_ones_bitwise(tmp_path, dataset, sync_reference):  # noqa: F811
    p = hpcllm("train", str(train_spec(tmp_path, dataset, name="async", async_checkpoint=True, **_STEPS)), n=2)
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "async"
    assert "written in the background" in p.stderr
    assert losses(run) == losses(sync_reference)
    names = sorted(c.name for c in (run / "checkpoints").iterdir())
    assert names == ["step_00000004", "step_00000008", "step_00000012"]  # no .tmp left behind
    from hpcllm.checkpoint import read_checkpoint_model

    for name in names:
        a = read_checkpoint_model(run / "checkpoints" / name)
        b = read_checkpoint_model(sync_reference / "checkpoints" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [len(r.get("ckpt_s", [])) for r in recs].count(1) == 2  # steps 4 and 8 (the last is after the loop)


def test_kill_during_a_background_write_resumes_exactly_from_the_last_complete_checkpoint(
        tmp_path, dataset, sync_reference):  # noqa: F811
    spec = train_spec(tmp_path, dataset, name="killed", async_checkpoint=True, **_STEPS)
    markers = tmp_path / "markers"
    markers.mkdir()
    cmd = mpirun_cmd(2, sys.executable, "-m", "tests.train.slow_background_save", "8", str(markers), "train", str(spec))
    proc = subprocess.Popen(cmd, env=mpi_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(markers.iterdir())) < 2 and proc.poll() is None:
        time.sleep(0.1)
    assert len(list(markers.iterdir())) == 2, "the step-8 background write never started on both ranks"
    os.killpg(proc.pid, signal.SIGKILL)  # every rank, mid-write: no goodbye
    proc.wait(timeout=30)
    ckpts = Path(tmp_path / "killed" / "checkpoints")
    names = sorted(c.name for c in ckpts.iterdir())
    assert "step_00000008" not in names and "step_00000008.tmp" in names, names  # never looks complete
    assert (ckpts / "step_00000008.tmp" / "state.pt").is_file()  # the side files were there: still not complete

    r = hpcllm("train", str(spec), n=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "step_00000004" in r.stderr
    assert losses(tmp_path / "killed") == losses(sync_reference)
    (wa, na), (wb, nb) = weights(sync_reference), weights(tmp_path / "killed")
    assert na == nb == "step_00000012" and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_what_is_written_is_a_copy_taken_when_the_save_starts(tmp_path):
    from hpcllm.checkpoint import is_complete, read_checkpoint_model, save_checkpoint
    from hpcllm.comm import SingleProcess, detect_world

    comm = SingleProcess(detect_world(), torch.device("cpu"), 10.0)
    w = torch.arange(1000, dtype=torch.float32)
    pending = save_checkpoint(tmp_path, 3, comm, {"model": {"w": w}}, {}, {"spec": {}}, keep=2, background=True)
    w.mul_(-1)  # the next optimizer step, while the write may still be in flight
    final = tmp_path / "checkpoints" / "step_00000003"
    assert pending.final == final
    pending.wait()
    assert not final.exists()  # written, but visible only once finished
    assert pending.finish() == final and is_complete(final)
    assert torch.equal(read_checkpoint_model(final)["w"], torch.arange(1000, dtype=torch.float32))
