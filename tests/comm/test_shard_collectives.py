"""ZeRO's sharded collectives, reduce_scatter and all_gather, on real MPI ranks, for every backend.

One mpirun per backend and world size runs every check on every rank; each rank compares its own
results with the exact expected values and returns what was wrong, and the test fails on any rank's
mismatch. Values are distinct per rank and per element, and chosen so that sums and averages are
exact in float32 and bfloat16 alike: a wrong shard, a missing or doubled contribution, or a
division by the wrong size changes them. The torch communicator over a subgroup (a mesh dimension's
ranks) keeps every collective within the group.
"""

import importlib.util

import pytest

from tests.mpi_util import run_on_ranks

BACKENDS = ["mpi", "torch", pytest.param("horovod", marks=pytest.mark.horovod)]


def _value(torch, q: int, n_elems: int, dtype, gather: bool = False):
    """Rank q's values: distinct per element and per rank (also between the reduce-scatter and the
    all-gather values), and exact in `dtype` however they are summed or averaged over up to 3 ranks.
    float32: j + 2**20 q (+ 0.5 for an all-gather). bfloat16 (8 significant bits): a mantissa in
    [16, 32), unique per rank and j % 5, scaled by 2 ** (j // 5) (negated for an all-gather)."""
    j = torch.arange(n_elems, dtype=torch.float64)
    if dtype == torch.bfloat16:
        v = (16 + j % 5 + 5 * q) * torch.pow(2.0, torch.div(j, 5, rounding_mode="floor")) * (-1 if gather else 1)
    else:
        v = j + 2**20 * q + 0.5 * gather
    return v.to(dtype)


def _body_shards(backend: str, device: str = "cpu") -> dict:
    import torch

    from hpcllm.comm import DistConfig, init_comm

    comm = init_comm(DistConfig(backend=backend, device=device, timeout_s=60))
    r, n, dev = comm.rank, comm.size, comm.device
    wrong: list[str] = []
    checks = 0

    def check(what: str, got, want) -> None:
        nonlocal checks
        checks += 1
        got, want = got.cpu(), want.cpu()
        if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
            bad = (got.double() != want.double()).nonzero().flatten()[:5].tolist() if got.shape == want.shape else []
            wrong.append(f"rank {r}: {what}: got {got.dtype} {tuple(got.shape)}, want {want.dtype} "
                         f"{tuple(want.shape)}; first wrong elements {bad}: got "
                         f"{[float(got[i]) for i in bad]}, want {[float(want[i]) for i in bad]}")

    def rs_case(k: int, dtype, op: str):
        """(output, input, expected output) of a reduce_scatter of size*k elements."""
        full = [_value(torch, q, n * k, dtype).double() for q in range(n)]
        want = sum(full)[r * k : (r + 1) * k]
        if op == "avg":
            want = want / n
        inp = full[r].to(dtype).to(dev)
        return torch.full((k,), -1.0, dtype=dtype, device=dev), inp, want.to(dtype)

    def ag_case(k: int, dtype):
        """(output, input, expected output) of an all_gather of k elements per rank."""
        shards = [_value(torch, q, k, dtype, gather=True) for q in range(n)]
        return torch.full((n * k,), -1.0, dtype=dtype, device=dev), shards[r].to(dev), torch.cat(shards)

    dtypes = [torch.float32, torch.bfloat16]
    # synchronous: each dtype and op, a small and (fp32) a larger buffer
    for dtype in dtypes:
        for k in ([1, 5, 40_000] if dtype == torch.float32 else [1, 5, 100]):
            for op in ("sum", "avg"):
                out, inp, want = rs_case(k, dtype, op)
                before = inp.clone()
                assert comm.reduce_scatter(out, inp, op) is None
                check(f"reduce_scatter {op} {dtype} k={k}", out, want)
                check(f"reduce_scatter {op} {dtype} k={k} leaves its input", inp, before)
            out, inp, want = ag_case(k, dtype)
            assert comm.all_gather(out, inp) is None
            check(f"all_gather {dtype} k={k}", out, want)

    # asynchronous: many in flight at once — both ops and dtypes, equal sizes twice (Horovod's
    # names), an allreduce among them — then waited in order; twice, as two training steps would
    for step in range(2):
        cases = []
        for dtype in dtypes:
            for k in (7, 7, 3000 if dtype == torch.float32 else 64):
                for op in ("sum", "avg"):
                    out, inp, want = rs_case(k, dtype, op)
                    cases.append((f"step {step} async reduce_scatter {op} {dtype} k={k}", out, want,
                                  comm.reduce_scatter(out, inp, op, async_op=True)))
                out, inp, want = ag_case(k, dtype)
                cases.append((f"step {step} async all_gather {dtype} k={k}", out, want,
                              comm.all_gather(out, inp, async_op=True)))
            if backend != "horovod" or dtype == torch.float32:  # Horovod's allreduce has no bf16
                t = torch.full((11,), float(r + 1), dtype=dtype, device=dev)
                cases.append((f"step {step} async allreduce sum {dtype} among them", t,
                              torch.full((11,), float(n * (n + 1) // 2), dtype=dtype),
                              comm.allreduce(t, "sum", async_op=True)))
        comm.progress()
        for i, (what, out, want, work) in enumerate(cases):
            work.label = f"case {i + 1}/{len(cases)}"
            if i % 3 == 0:
                comm.progress()
            work.wait()
            check(what, out, want)
        cases[0][3].wait()  # waiting again is a no-op

    # wrong arguments: a clear ValueError on every rank, before any communication
    f32 = dict(dtype=torch.float32, device=dev)
    errors = []
    for call in (
        lambda: comm.reduce_scatter(torch.zeros(3, **f32), torch.zeros(3 * n + 1, **f32)),
        lambda: comm.all_gather(torch.zeros(3 * n + 1, **f32), torch.zeros(3, **f32), async_op=True),
        lambda: comm.reduce_scatter(torch.zeros(2, **f32), torch.zeros(2 * n, **f32), "max"),
        lambda: comm.all_gather(torch.zeros(2 * n, dtype=torch.bfloat16, device=dev), torch.zeros(2, **f32)),
        lambda: comm.reduce_scatter(torch.zeros(2, **f32), torch.zeros(n, 2, **f32)),
    ):
        try:
            call()
            errors.append("no error")
        except ValueError as e:
            errors.append(str(e))
    comm.barrier()
    comm.close()
    return {"rank": r, "size": n, "name": comm.name, "checks": checks, "wrong": wrong, "errors": errors}


def _assert_every_rank(results: list, n: int, backend: str) -> None:
    assert len(results) == n
    wrong = [w for res in results for w in res["wrong"]]
    assert not wrong, f"{len(wrong)} wrong results:\n" + "\n".join(wrong[:20])
    for r, res in enumerate(results):
        assert (res["rank"], res["size"], res["name"]) == (r, n, backend)
        assert res["checks"] == results[0]["checks"] > 40, res
        e = res["errors"]
        assert f"input has {3 * n + 1} elements, output 3; with {n} ranks input must have size * output elements = {3 * n}" in e[0], e
        assert f"output has {3 * n + 1} elements, input 3" in e[1], e
        assert "unknown reduce op 'max'" in e[2], e
        assert "dtypes differ" in e[3], e
        assert "must be a flat contiguous tensor" in e[4], e


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_shard_collectives(backend, n):
    if backend == "horovod" and importlib.util.find_spec("horovod") is None:
        pytest.fail("horovod is not installed: run scripts/build_horovod.sh (make test does)")
    results = run_on_ranks(n, "tests.comm.test_shard_collectives:_body_shards", backend=backend)
    _assert_every_rank(results, n, backend)


@pytest.mark.mpi
@pytest.mark.gpu
def test_shard_collectives_mpi_on_gpu_tensors():
    # CUDA tensors on the mpi backend go through host copies and the communication thread
    results = run_on_ranks(2, "tests.comm.test_shard_collectives:_body_shards", backend="mpi", device="cuda")
    _assert_every_rank(results, 2, "mpi")


def test_single_process_is_identity():
    res = _body_shards("single")
    _assert_every_rank([res], 1, "single")


def _body_subgroup() -> dict:
    """The torch communicator over the 2-rank subgroups {0, 2} and {1, 3} of 4 ranks (the dp groups of
    a dp=2 x tp=2 mesh, as ZeRO-1 under tensor parallelism uses them): every collective reduces and
    gathers within the group only, ranks and sizes are the group's."""
    import torch
    import torch.distributed as dist

    from hpcllm.comm import DistConfig, init_comm

    comm = init_comm(DistConfig(backend="torch", timeout_s=60))
    groups = {r: dist.new_group([r % 2, r % 2 + 2]) for r in (0, 1)}  # every rank creates every group
    sub = comm.subgroup(groups[comm.rank % 2])
    peers = [comm.rank % 2, comm.rank % 2 + 2]  # global ranks, in group-rank order
    k = 3
    full = torch.arange(2 * k, dtype=torch.float32) + 100 * comm.rank
    shard = torch.zeros(k)
    sub.reduce_scatter(shard, full, "sum")
    want_rs = sum(torch.arange(2 * k, dtype=torch.float32) + 100 * q for q in peers)[sub.rank * k:(sub.rank + 1) * k]
    gathered = torch.zeros(2 * k)
    sub.all_gather(gathered, torch.full((k,), float(comm.rank)), async_op=True).wait()
    avg = torch.tensor([float(comm.rank)])
    sub.allreduce(avg, "avg")
    b = torch.tensor([float(comm.rank)])
    sub.broadcast(b, src=1)
    objects = sub.allgather_object(comm.rank)
    sub.barrier()
    sub.close()  # closes nothing: the world's communicator still works
    whole = torch.ones(1)
    comm.allreduce(whole)
    comm.close()
    return {"rank": sub.rank, "size": sub.size, "rs": shard.tolist(), "want_rs": want_rs.tolist(),
            "gathered": gathered.tolist(), "want_gathered": [float(q) for q in peers for _ in range(k)],
            "avg": avg.item(), "want_avg": sum(peers) / 2, "bcast": b.item(), "want_bcast": float(peers[1]),
            "objects": objects, "peers": peers, "world_sum": whole.item()}


@pytest.mark.mpi
def test_torch_subgroup_collectives_stay_within_the_group():
    results = run_on_ranks(4, "tests.comm.test_shard_collectives:_body_subgroup")
    for global_rank, res in enumerate(results):
        assert (res["rank"], res["size"]) == (global_rank // 2, 2), res
        for key in ("rs", "gathered", "avg", "bcast"):
            assert res[key] == res[f"want_{key}"], (global_rank, key, res)
        assert res["objects"] == res["peers"] and res["world_sum"] == 4.0, res
