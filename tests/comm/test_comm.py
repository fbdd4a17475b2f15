"""The communicator interface on real MPI ranks, for every backend."""

import importlib.util
import sys
import time

import pytest

from tests.mpi_util import run_mpi, run_on_ranks

BACKENDS = ["mpi", "torch", pytest.param("horovod", marks=pytest.mark.horovod)]


def _body_collectives(backend: str) -> dict:
    import torch

    from hpcllm.comm import DistConfig, init_comm

    comm = init_comm(DistConfig(backend=backend, timeout_s=60))
    r, n = comm.rank, comm.size
    out = {"rank": r, "size": n, "name": comm.name}
    t = torch.arange(5, dtype=torch.float32) + r
    comm.allreduce(t, "sum")
    out["sum"] = t.tolist()
    t = torch.full((3,), float(r + 1))
    comm.allreduce(t, "avg")
    out["avg"] = t.tolist()
    t = torch.tensor([float(r), -float(r)], dtype=torch.float64)
    comm.allreduce(t, "max")
    out["max"] = t.tolist()
    # async: several in flight at once, then waited in order (what the gradient buckets do)
    bufs = [torch.full((1000 * (i + 1),), float(r + i)) for i in range(4)]
    works = [comm.allreduce(b, "sum", async_op=True) for b in bufs]
    for w in works:
        w.wait()
    out["async"] = [float(b[0]) for b in bufs] + [float(b[-1]) for b in bufs]
    # averaging, and fp32 (non-blocking on the mpi backend) in flight together with bf16 (its comm thread)
    mixed = [torch.full((3000,), float(r + 1)), torch.full((5,), float(r + 1))]
    if backend != "horovod":
        mixed.insert(1, torch.full((7,), float(r + 1), dtype=torch.bfloat16))
    works = [comm.allreduce(m, "avg", async_op=True) for m in mixed]
    comm.progress()
    for w in works:
        w.wait()
    out["async_avg"] = sorted({float(x) for m in mixed for x in m.float()})
    # integer and bf16 tensors (bf16 is staged through fp32 on the mpi backend)
    i = torch.tensor([r + 1], dtype=torch.int64)
    comm.allreduce(i, "sum")
    out["int"] = int(i[0])
    if backend != "horovod":
        h = torch.tensor([0.5 * (r + 1)], dtype=torch.bfloat16)
        comm.allreduce(h, "sum")
        out["bf16"] = float(h[0])
    b = torch.full((4,), float(r + 10))
    comm.broadcast(b, src=n - 1)
    out["bcast"] = b.tolist()
    out["gather"] = comm.allgather_object({"r": r, "s": "x" * r})
    out["bobj"] = comm.broadcast_object({"from": r} if r == 0 else None)
    out["exscan"] = list(comm.exscan(10 * (r + 1)))
    out["any"] = [comm.any(r == n - 1), comm.any(False)]
    comm.barrier()
    comm.close()
    return out


def _expected(r: int, n: int) -> dict:
    return {
        "rank": r,
        "size": n,
        "sum": [float(n * k + n * (n - 1) / 2) for k in range(5)],
        "avg": [sum(range(1, n + 1)) / n] * 3,
        "max": [float(n - 1), 0.0],
        "async": [float(sum(q + i for q in range(n))) for i in range(4)] * 2,
        "async_avg": [(n + 1) / 2],
        "int": n * (n + 1) // 2,
        "bcast": [float(n - 1 + 10)] * 4,
        "gather": [{"r": q, "s": "x" * q} for q in range(n)],
        "bobj": {"from": 0},
        "exscan": [sum(10 * (q + 1) for q in range(r)), sum(10 * (q + 1) for q in range(n))],
        "any": [True, False],
    }


@pytest.mark.mpi
@pytest.mark.parametrize("backend", BACKENDS)
def test_collectives_two_ranks(backend):
    if backend == "horovod" and importlib.util.find_spec("horovod") is None:
        pytest.fail("horovod is not installed: run scripts/build_horovod.sh (make test does)")
    results = run_on_ranks(2, "tests.comm.test_comm:_body_collectives", backend=backend)
    for r, res in enumerate(results):
        assert res["name"] == backend
        got = {k: v for k, v in res.items() if k in _expected(r, 2)}
        assert got == _expected(r, 2), f"rank {r}"
        if "bf16" in res:
            assert res["bf16"] == 1.5


@pytest.mark.mpi
def test_collectives_three_ranks_oversubscribed():
    results = run_on_ranks(3, "tests.comm.test_comm:_body_collectives", backend="mpi")
    for r, res in enumerate(results):
        got = {k: v for k, v in res.items() if k in _expected(r, 3)}
        assert got == _expected(r, 3), f"rank {r}"


def test_single_process_is_identity():
    res = _body_collectives("single")
    assert res["name"] == "single" and res["size"] == 1
    assert {k: v for k, v in res.items() if k in _expected(0, 1)} == _expected(0, 1)


HANG = """
import sys, time, torch
from hpcllm.comm import DistConfig, init_comm
comm = init_comm(DistConfig(backend=sys.argv[1], timeout_s=float(sys.argv[2])))
t = torch.ones(1000)
comm.allreduce(t)                      # everyone arrives at collective #1
if comm.rank == comm.size - 1:
    time.sleep(600)                    # the last rank never reaches collective #2
comm.allreduce(t)
print("unreachable", flush=True)
"""


@pytest.mark.mpi
@pytest.mark.parametrize("backend", BACKENDS)
def test_watchdog_names_the_missing_rank(backend, tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(HANG)
    t0 = time.monotonic()
    proc = run_mpi(3, [sys.executable, str(script), backend, "3"], timeout=90)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert "unreachable" not in proc.stdout
    assert "did not complete within dist.timeout_s=3 s" in proc.stderr, proc.stderr[-2000:]
    assert "no answer from rank(s) 2" in proc.stderr, proc.stderr[-2000:]
    assert elapsed < 45, f"took {elapsed:.0f} s to give up"


# Twice in one job (one launch instead of two): with HPCLLM_LOG_LEVEL=debug into argv[2], then at
# the default level into argv[3]. Tracing is decided at each collective (the logger's level, which
# setup_logging sets from the variable), so the second pass is what a job started without it does.
TRACED = """
import os, sys, torch
from hpcllm.comm import DistConfig, init_comm
from hpcllm.log import setup_logging
from hpcllm.parallel.grad_sync import GradSync
comm = init_comm(DistConfig(backend=sys.argv[1], timeout_s=60))
for run_dir, level in ((sys.argv[2], "debug"), (sys.argv[3], "")):
    os.environ["HPCLLM_LOG_LEVEL"] = level
    setup_logging(comm.rank, run_dir)
    params = [torch.nn.Parameter(torch.ones(50_000)) for _ in range(3)]  # 3 buckets of 0.19 MB
    sync = GradSync(params, comm, bucket_mb=0.1)
    sum(p.sum() for p in params).backward()
    sync.finish()
    comm.barrier()
comm.close()
"""


@pytest.mark.mpi
@pytest.mark.parametrize("backend", BACKENDS)
def test_collective_tracing_at_debug_level_on_every_rank(backend, tmp_path):
    script = tmp_path / "traced.py"
    script.write_text(TRACED)
    proc = run_mpi(2, [sys.executable, str(script), backend, str(tmp_path), str(tmp_path / "quiet")], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        lines = [x for x in (tmp_path / "logs" / f"rank{rank}.log").read_text().splitlines() if "hpcllm.comm:" in x]
        buckets = [x for x in lines if "allreduce sum 0.19 MB float32 [bucket" in x]
        assert len(buckets) == 3, lines  # which collective, which bucket, bytes and dtype
        assert all("in flight" in x and "blocked" in x and " ms" in x for x in buckets), buckets
        assert {x.split("[bucket ")[1].split("]")[0] for x in buckets} == {"1/3", "2/3", "3/3"}
        assert any("barrier" in x for x in lines)
    for rank in (0, 1):  # the second pass, at the default level: nothing traced
        assert "hpcllm.comm:" not in (tmp_path / "quiet" / "logs" / f"rank{rank}.log").read_text()


SUSPENDED = """
import os, sys, time, torch
from hpcllm.comm import DistConfig, init_comm
comm = init_comm(DistConfig(backend=sys.argv[1], timeout_s=3))
t = torch.ones(10)
open(os.path.join(sys.argv[2], f"pid{comm.rank}"), "w").write(str(os.getpid()))
for i in range(40):               # ~8 s of collectives; the whole job is stopped for 8 s meanwhile
    comm.allreduce(t)             # rank 0 spends its time here, waiting for rank 1
    if comm.rank == 1:
        time.sleep(0.2)
comm.close()
print("finished", comm.rank, flush=True)
"""


@pytest.mark.mpi
def test_a_suspended_and_resumed_job_carries_on(tmp_path):
    # what `scontrol suspend` / `resume` does to a job: SIGSTOP, later SIGCONT, to every rank. Time
    # stopped is not time waited: the watchdog (3 s) must not abort the resumed job
    import os
    import signal
    import subprocess

    from tests.mpi_util import mpi_env, mpirun_cmd

    script = tmp_path / "suspended.py"
    script.write_text(SUSPENDED)
    proc = subprocess.Popen(mpirun_cmd(2, sys.executable, str(script), "mpi", str(tmp_path)), env=mpi_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all((tmp_path / f"pid{r}").exists() for r in (0, 1)):
        time.sleep(0.1)
    pids = [int((tmp_path / f"pid{r}").read_text()) for r in (0, 1)]
    time.sleep(1.0)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    time.sleep(8)  # far past dist.timeout_s
    for pid in pids:
        os.kill(pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err[-3000:]
    assert out.count("finished") == 2 and "did not complete" not in err
    assert "did not run for" in err  # the gap is noticed and said


@pytest.mark.mpi
def test_a_stopped_rank_is_named_and_once_continued_does_not_blame_the_others(tmp_path):
    # one rank stopped (SIGSTOP; a debugger, a node's OOM freezer): the other times out naming it
    # and ends the job; the stopped rank, continued while the job ends, must not report its own
    # (frozen) time as waiting, nor say "every rank answered"
    import os
    import signal
    import subprocess
    import threading

    from tests.mpi_util import mpi_env, mpirun_cmd

    script = tmp_path / "stopped.py"
    # rank 1 waits in its allreduces while rank 0 sleeps between them: rank 1 is stopped mid-collective
    script.write_text(SUSPENDED.replace("comm.rank == 1", "comm.rank == 0"))
    proc = subprocess.Popen(mpirun_cmd(2, sys.executable, str(script), "mpi", str(tmp_path)), env=mpi_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all((tmp_path / f"pid{r}").exists() for r in (0, 1)):
        time.sleep(0.1)
    pid1 = int((tmp_path / "pid1").read_text())
    time.sleep(0.5)
    os.kill(pid1, signal.SIGSTOP)
    lines: list[str] = []
    fired = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "did not complete within" in line:
                fired.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert fired.wait(30), "".join(lines)[-3000:]
    try:
        os.kill(pid1, signal.SIGCONT)  # while rank 0 is still asking the others, before the job ends
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    reader.join(timeout=10)
    err = "".join(lines)
    assert proc.returncode == 4, err[-3000:]
    assert "[hpcllm rank 0] collective" in err and "no answer from rank(s) 1" in err, err[-3000:]
    assert "[hpcllm rank 1]" not in err and "every rank answered" not in err, err[-3000:]


STUCK_LOADER = """
import sys, time, torch
from hpcllm.comm import DistConfig, init_comm
comm = init_comm(DistConfig(backend="mpi", timeout_s=3))
comm.allreduce(torch.ones(3))
if comm.rank == 1:
    with comm.waiting("the data loader (next training batch)"):
        time.sleep(600)           # a loader that never delivers
comm.allreduce(torch.ones(3))
print("unreachable", flush=True)
"""


@pytest.mark.mpi
def test_a_rank_stuck_outside_communication_names_itself(tmp_path):
    script = tmp_path / "stuck.py"
    script.write_text(STUCK_LOADER)
    t0 = time.monotonic()
    proc = run_mpi(2, [sys.executable, str(script)], timeout=90)
    assert proc.returncode != 0 and "unreachable" not in proc.stdout
    assert "[hpcllm rank 1] stuck in the data loader (next training batch) (not a collective)" in proc.stderr, \
        proc.stderr[-2000:]
    assert time.monotonic() - t0 < 45
