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
