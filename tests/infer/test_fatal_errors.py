"""A failure on one rank ends every rank within seconds, with its one-line error on stderr and in the
rank's log — on every backend and launcher, static or dynamic schedule; the dynamic schedule works
on every backend (issue 11 defects 5 and 9, issue 10 item 9)."""

import json
import subprocess
import sys
import time

import pytest

from tests.infer.helpers import CliSession, infer_spec, outputs, prepare_prompts, run_cli, run_torchrun, tiny_model
from tests.mpi_util import run_mpi

pytestmark = pytest.mark.mpi
BACKENDS = ["mpi", "torch", pytest.param("horovod", marks=pytest.mark.horovod)]
LONG = "y" * 70  # 70 tokens: longer than the model's context of 64


def records(bad_shard: int | None) -> list[dict]:
    """15 records in 5 shards of 3; the middle record of `bad_shard` is too long for the model."""
    recs = [{"id": i, "prompt": f"prompt number {i}"} for i in range(15)]
    if bad_shard is not None:
        recs[3 * bad_shard + 1]["prompt"] = LONG
    return recs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The model, the four prompt sets, and the one-rank reference outputs `ref_single` that every
    backend's and launcher's dynamic schedule must reproduce — the inputs in one CLI process (what
    is tested here is the multi-rank jobs, not prepare), the reference as the real command."""
    root = tmp_path_factory.mktemp("fatal")
    tiny_model(root / "model")
    session = CliSession()
    try:
        for name, bad in (("good", None), ("bad0", 0), ("bad1", 1), ("bad4", 4)):
            p = prepare_prompts(root, records(bad), per_shard=3, name=name, cli=session.run)
            assert p.returncode == 0, p.stderr
    finally:
        session.close()
    ref = run_cli("infer", spec(root, "ref_single", "good"))
    assert ref.returncode == 0, ref.stderr[-2000:]
    return root


def spec(root, name, prompts, **infer):
    return infer_spec(root, name, model=root / "model", prompts=root / prompts, **infer)


def timed(run, *args, **kw):
    t0 = time.monotonic()
    try:
        p = run(*args, **kw)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {kw.get('timeout')} s: a rank is waiting for a peer that failed")
    return p, time.monotonic() - t0


def test_error_on_one_rank_reaches_stderr_and_its_log_every_time(setup):
    """Static schedule on 2 ranks: shard 1 (record 4, too long) is rank 1's. Seen missing in 3 of
    4 runs before; checked on 3 runs here."""
    for attempt in range(3):
        name = f"static_err{attempt}"
        p, took = timed(run_cli, "infer", spec(setup, name, "bad1", schedule="static"), n=2, timeout=90)
        line = "hpcllm infer: error (rank 1): record 4: prompt of 70 tokens + 12 new tokens exceeds"
        assert p.returncode == 5 and line in p.stderr, (attempt, p.stderr[-3000:])
        assert line in (setup / name / "logs" / "rank1.log").read_text(), attempt


# the first shard (rank 0 or 1 takes it) and the last one, each backend at least once: every pair adds
# a 2-rank job and nothing else — the failure ends the ranks through the same code whatever the shard
@pytest.mark.parametrize("backend,bad", [("mpi", "bad0"), ("mpi", "bad4"), ("torch", "bad4"),
                                         pytest.param("horovod", "bad0", marks=pytest.mark.horovod)])
def test_failure_on_one_rank_ends_every_rank_promptly(setup, backend, bad):
    """Dynamic schedule (the default), 5 shards, 2 ranks: whichever rank takes the bad shard fails;
    the job ends at once with the error instead of both ranks spinning until the time limit."""
    name = f"dyn_{backend}_{bad}"
    p, took = timed(run_cli, "infer", spec(setup, name, bad), f"dist.backend={backend}", n=2, timeout=120)
    shard = 0 if bad == "bad0" else 4
    assert p.returncode == 5, p.stderr[-3000:]
    assert f"record {3 * shard + 1}: prompt of 70 tokens" in p.stderr and "hpcllm infer: error (rank" in p.stderr
    assert took < 60, took
    assert not (setup / name / "outputs" / f"out-0000{shard}.h5.done").exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dynamic_schedule_runs_on_every_backend(setup, backend):
    name = f"dyn_ok_{backend}"
    p = run_cli("infer", spec(setup, name, "good"), f"dist.backend={backend}", n=2, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "schedule: dynamic (rank 0 hands out shards over MPI)" in p.stderr
    assert outputs(setup / name) == outputs(setup / "ref_single")


def test_torchrun_dynamic_schedule_and_a_failure(setup):
    """No MPI at all: torchrun workers draw shards from the torch.distributed store."""
    p = run_torchrun("infer", spec(setup, "torchrun_ok", "good"), "dist.backend=torch", timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "schedule: dynamic (an atomic counter in torch.distributed's store)" in p.stderr
    assert outputs(setup / "torchrun_ok") == outputs(setup / "ref_single")
    p, took = timed(run_torchrun, "infer", spec(setup, "torchrun_err", "bad0"), "dist.backend=torch", timeout=120)
    assert p.returncode != 0 and "record 1: prompt of 70 tokens" in p.stderr, p.stderr[-3000:]
    assert took < 60, took


@pytest.mark.parametrize("backend", BACKENDS)
def test_uncaught_exception_on_one_rank_ends_the_job(backend):
    """Not an hpcllm error (a bug): hpcllm.comm's excepthook prints the traceback and aborts, while
    rank 0 waits in a barrier that would otherwise last until dist.timeout_s."""
    body = ("import sys, time\n"
            "from hpcllm.comm import DistConfig, init_comm\n"
            f"comm = init_comm(DistConfig(backend='{backend}', timeout_s=600))\n"
            "if comm.rank == 1:\n"
            "    time.sleep(0.5)\n"
            "    raise RuntimeError('boom on rank 1')\n"
            "comm.barrier()\n")
    p, took = timed(run_mpi, 2, [sys.executable, "-c", body], timeout=90)
    assert p.returncode != 0 and "RuntimeError: boom on rank 1" in p.stderr, p.stderr[-3000:]
    assert took < 45, took


@pytest.mark.parametrize("backend", BACKENDS)
def test_prepare_failure_on_rank_0_ends_every_rank(tmp_path, backend):
    (tmp_path / "e.jsonl").write_text('{"id": 1, "prompt": "ok"}\n{"id": 2, "prompt": ""}\n')
    s = tmp_path / "prep.yaml"
    s.write_text(json.dumps({"kind": "prepare", "run_dir": str(tmp_path / "r"), "dist": {"backend": backend},
                             "data": {"inputs": [str(tmp_path / "e.jsonl")], "output": "prompts",
                                      "text_field": "prompt", "id_field": "id", "dataset": str(tmp_path / "ds")}}))
    p, took = timed(run_cli, "prepare", s, n=2, timeout=90)
    assert p.returncode == 5 and "record 2: empty prompt" in p.stderr, p.stderr[-3000:]
    assert took < 45, took


def test_unwritable_run_dir_on_two_ranks_is_one_line_per_rank(setup, tmp_path):
    (tmp_path / "a_file").write_text("")
    p = run_cli("infer", spec(setup, "rd2", "good"), f"run_dir={tmp_path / 'a_file' / 'run'}", n=2, timeout=90)
    errors = [ln for ln in p.stderr.splitlines() if "error" in ln]
    assert p.returncode == 8 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert errors and all("cannot be written (Not a directory): choose another run_dir" in ln for ln in errors)
