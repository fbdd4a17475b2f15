"""The core: bucketed, overlapped gradient allreduce gives the same model as one process on the
union of the ranks' batches, and as torch DDP — for every backend, on every rank."""

import importlib.util

import pytest

from tests.mpi_util import run_on_ranks

K_STEPS = 4


def _tiny(seed=0, arch="gpt2"):
    from hpcllm.model import ModelConfig, build_model

    extra = dict(n_kv_head=1, ffn_dim=48) if arch == "llama" else {}  # Llama-shaped: GQA 2:1, SwiGLU, RoPE
    cfg = ModelConfig(arch=arch, size="custom", n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64,
                      **extra).resolve()
    return build_model(cfg).init_weights(seed)


def _batch(step, rank, B=3, T=16):
    import torch

    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randint(0, 64, (B, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def _train_reference(world, steps, grad_accum=1, arch="gpt2"):
    """One process on the union of all ranks' micro-batches."""
    import torch

    model = _tiny(arch=arch)
    opt = model.configure_optimizer(0.1, 1e-2, (0.9, 0.95), fused=False)
    for s in range(steps):
        opt.zero_grad()
        for m in range(grad_accum):
            xs, ys = zip(*[_batch(s * grad_accum + m, r) for r in range(world)])
            _, loss = model(torch.cat(xs), torch.cat(ys))
            (loss / grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model


def _flat(model):
    import torch

    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _body_grad_sync(backend, grad_accum=1, bucket_mb=0.01, arch="gpt2"):
    import torch

    from hpcllm.comm import DistConfig, init_comm
    from hpcllm.parallel.grad_sync import GradSync

    comm = init_comm(DistConfig(backend=backend, timeout_s=60))
    torch.manual_seed(100 + comm.rank)
    model = _tiny(seed=comm.rank, arch=arch)  # deliberately different: the broadcast must fix it
    gs = GradSync(list(model.parameters()), comm, bucket_mb)
    gs.broadcast_parameters(list(model.parameters()))
    opt = model.configure_optimizer(0.1, 1e-2, (0.9, 0.95), fused=False)
    for s in range(K_STEPS):
        for m in range(grad_accum):
            x, y = _batch(s * grad_accum + m, comm.rank)
            last = m == grad_accum - 1
            ctx = torch.enable_grad() if last else gs.no_sync()
            with ctx:
                _, loss = model(x, y)
                (loss / grad_accum).backward()
        gs.finish()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        gs.zero_grad()
    ours = _flat(model)
    ref = _flat(_train_reference(comm.size, K_STEPS, grad_accum, arch))
    out = {
        "n_buckets": len(gs.buckets),
        "rel_vs_single": float((ours - ref).norm() / ref.norm()),
        "checksum": float(ours.double().sum()),
        "first": ours[:5].tolist(),
    }
    comm.close()
    if grad_accum == 1:
        out["rel_vs_ddp"] = _ddp_rel(ours, arch)
    return out


def _ddp_rel(ours, arch="gpt2"):
    """torch DDP (gloo) on the same data, in a torch.distributed group of its own."""
    import os

    import torch
    import torch.distributed as tdist
    from mpi4py import MPI

    from hpcllm.comm import detect_world
    from hpcllm.comm.torchdist import release_gloo_work, rendezvous

    world = detect_world()
    if not tdist.is_initialized():
        addr, port = rendezvous(world, MPI.COMM_WORLD)
        tdist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=world.rank, world_size=world.size)
    model = torch.nn.parallel.DistributedDataParallel(_tiny(arch=arch))
    opt = model.module.configure_optimizer(0.1, 1e-2, (0.9, 0.95), fused=False)
    for s in range(K_STEPS):
        opt.zero_grad()
        x, y = _batch(s, world.rank)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    theirs = _flat(model.module)
    del model, opt
    tdist.barrier()
    release_gloo_work()
    tdist.destroy_process_group()
    os.environ.pop("MASTER_ADDR", None)
    return float((ours - theirs).norm() / theirs.norm())


def _body_grad_sync_archs(backend, archs):
    """_body_grad_sync for each model shape in turn, in one launch: each opens and closes its own
    communicator (and DDP's group), and compares with references computed in the body itself."""
    return {arch: _body_grad_sync(backend, arch=arch) for arch in archs}


@pytest.fixture(scope="module")
def two_rank_runs():
    """`runs(backend)`: every rank's results of _body_grad_sync for GPT-2 and (where a test below
    asks for it: mpi, torch) Llama shapes, from one 2-rank launch per backend, not one per shape."""
    done = {}

    def runs(backend):
        if backend not in done:
            archs = ["gpt2"] if backend == "horovod" else ["gpt2", "llama"]
            done[backend] = run_on_ranks(2, "tests.train.test_grad_sync:_body_grad_sync_archs", backend=backend,
                                         archs=archs, timeout=150)
        return done[backend]

    return runs


@pytest.mark.mpi
@pytest.mark.parametrize("backend", ["mpi", "torch", pytest.param("horovod", marks=pytest.mark.horovod)])
def test_two_ranks_equal_single_process_and_ddp(backend, two_rank_runs):
    if backend == "horovod" and importlib.util.find_spec("horovod") is None:
        pytest.fail("horovod is not installed: run scripts/build_horovod.sh (make test does)")
    res = [r["gpt2"] for r in two_rank_runs(backend)]
    assert res[0]["n_buckets"] > 3  # several buckets, launched during backward
    assert res[0]["first"] == res[1]["first"] and res[0]["checksum"] == res[1]["checksum"]  # identical ranks
    for r in res:
        assert r["rel_vs_single"] <= 1e-5, r
        assert r["rel_vs_ddp"] <= 1e-5, r


@pytest.mark.mpi
@pytest.mark.parametrize("backend", ["mpi", "torch"])
def test_two_ranks_train_a_llama_shaped_model_like_one_rank(backend, two_rank_runs):
    res = [r["llama"] for r in two_rank_runs(backend)]
    assert res[0]["checksum"] == res[1]["checksum"]
    for r in res:
        assert r["rel_vs_single"] <= 1e-5, r
        assert r["rel_vs_ddp"] <= 1e-5, r


@pytest.mark.mpi
def test_gradient_accumulation_three_ranks():
    res = run_on_ranks(3, "tests.train.test_grad_sync:_body_grad_sync", backend="mpi", grad_accum=3, timeout=180)
    assert len({r["checksum"] for r in res}) == 1
    assert all(r["rel_vs_single"] <= 1e-5 for r in res), res


def _body_no_comm_on_micro_steps():

    from hpcllm.comm import DistConfig, init_comm
    from hpcllm.parallel.grad_sync import GradSync

    comm = init_comm(DistConfig(backend="mpi"))
    calls = []
    real = comm.allreduce
    comm.allreduce = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    model = _tiny()
    gs = GradSync(list(model.parameters()), comm, 0.01)
    with gs.no_sync():
        for m in range(3):
            x, y = _batch(m, comm.rank)
            model(x, y)[1].backward()
    during_micro = len(calls)
    x, y = _batch(9, comm.rank)
    model(x, y)[1].backward()
    launched_in_backward = len(calls)
    gs.finish()
    comm.close()
    return {"micro": during_micro, "backward": launched_in_backward, "total": len(calls), "buckets": len(gs.buckets)}


@pytest.mark.mpi
def test_no_communication_on_micro_steps_and_launch_during_backward():
    for r in run_on_ranks(2, "tests.train.test_grad_sync:_body_no_comm_on_micro_steps"):
        assert r["micro"] == 0
        assert r["backward"] == r["buckets"] == r["total"]  # every bucket launched before finish()


def test_one_rank_has_no_buckets_no_collectives_and_matches_a_plain_loop_bitwise():
    import torch

    from hpcllm.comm import DistConfig, init_comm
    from hpcllm.parallel.grad_sync import GradSync

    comm = init_comm(DistConfig(backend="single"))
    calls = []
    real = comm.allreduce
    comm.allreduce = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    model = _tiny()
    gs = GradSync(list(model.parameters()), comm, 0.01)
    opt = model.configure_optimizer(0.1, 1e-2, (0.9, 0.95), fused=False)
    for s in range(K_STEPS):
        for m in range(2):  # accumulation still works with gradients freed between steps
            x, y = _batch(s * 2 + m, 0)
            with gs.no_sync() if m == 0 else torch.enable_grad():
                (model(x, y)[1] / 2).backward()
        gs.finish()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        gs.zero_grad()
        assert all(p.grad is None for p in model.parameters())
    comm.close()
    assert gs.buckets == [] and calls == []
    assert torch.equal(_flat(model), _flat(_train_reference(1, K_STEPS, grad_accum=2)))
