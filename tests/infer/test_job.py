"""The inference job: same outputs from 1/2 ranks, static/dynamic schedules, batch sizes and an
interrupted-and-resumed run; bad inputs give clear errors and nothing marked done that isn't.

The one-process commands run in one Python process (`cli`, a CliSession: ~3 s of start-up each
saved), except one of each kind — a run, a resume, an export, an error exit — kept as the real
command line (`run_cli`)."""

import json
import shutil

import pytest

from tests.infer.helpers import infer_spec, outputs, prepare_prompts, run_cli, tiny_model

N_PROMPTS = 13


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cli):
    root = tmp_path_factory.mktemp("infer")
    tiny_model(root / "model")
    lines = [{"id": 500 + i, "prompt": "x = " * (1 + i % 5) + str(i), "cont": f" # {i}"} for i in range(N_PROMPTS)]
    p = prepare_prompts(root, lines, per_shard=3, cli=cli, continuation_field="cont")
    assert p.returncode == 0, p.stderr
    return root


@pytest.fixture(scope="module")
def want(setup):
    """The outputs of one rank (batch size 8) that every other layout must reproduce; the real command."""
    ref = infer(str(spec(setup, "one", batch_size=8)))
    assert ref.returncode == 0, ref.stderr[-2000:]
    return outputs(setup / "one")


def spec(root, name, **infer):
    return infer_spec(root, name, **{"model": root / "model", "prompts": root / "prompts", **infer})


def infer(*args, n=1, env=None):
    return run_cli("infer", *args, n=n, env=env)


@pytest.mark.mpi
def test_same_outputs_whatever_ranks_schedule_and_batch(setup, want, cli):
    assert sorted(want) == [500 + i for i in range(N_PROMPTS)]
    assert all(0 < len(v) <= 12 for v in want.values())
    for name, n, kw in (("two_dyn", 2, {}), ("two_static", 2, {"schedule": "static"}), ("bs1", 1, {"batch_size": 1})):
        p = infer(str(spec(setup, name, **kw)), n=n) if n > 1 else cli("infer", spec(setup, name, **kw))
        assert p.returncode == 0, p.stderr[-2000:]
        assert outputs(setup / name) == want, name


def test_resume_skips_done_shards_and_matches(setup, cli):
    s = spec(setup, "resume")
    assert cli("infer", s).returncode == 0
    want = outputs(setup / "resume")
    outd = setup / "resume" / "outputs"
    # an interrupted run: one shard never finished (output but no marker), one half-written
    (outd / "out-00002.h5.done").unlink()
    (outd / "out-00003.h5").write_bytes(b"partial")
    (outd / "manifest.json").unlink()
    again = infer(str(s))
    assert again.returncode == 0 and "2 of 5 shards" not in again.stderr
    assert "resuming: 3 of 5 shards already done" in again.stderr
    assert outputs(setup / "resume") == want


def test_score_and_export(setup, tmp_path, cli):
    s = spec(setup, "score", mode="score")
    assert cli("infer", s).returncode == 0
    scores = outputs(setup / "score")
    assert len(scores) == N_PROMPTS and all(v < 0 for v in scores.values())
    out = tmp_path / "s.jsonl"
    p = infer("export", str(setup / "score"), "--jsonl", str(out))
    assert p.returncode == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["id"] for r in rows} == set(scores) and all(len(r["token_logprobs"]) == r["n_tokens"] for r in rows)


def test_bad_inputs(setup, tmp_path, cli):
    # corrupt prompt shard: named, nothing marked done for it
    bad = tmp_path / "prompts"
    shutil.copytree(setup / "prompts", bad)
    (bad / "prompts-00001.h5").write_bytes((bad / "prompts-00001.h5").read_bytes()[:200])
    p = cli("infer", spec(setup, "corrupt", prompts=str(bad)))
    assert p.returncode == 5 and "prompts-00001.h5" in p.stderr and "Traceback" not in p.stderr
    # prompt longer than the context
    p = cli("infer", spec(setup, "long", max_new_tokens=60))
    assert p.returncode == 5 and "exceeds the model's context of 64" in p.stderr and "record 5" in p.stderr
    # tokenizer/vocabulary mismatch
    from hpcllm.model import ModelConfig, build_model, save_hf_model

    save_hf_model(build_model(ModelConfig(size="custom", n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=300).resolve()),
                 tmp_path / "m300")
    p = cli("infer", spec(setup, "vocab", model=str(tmp_path / "m300")))
    assert p.returncode == 8 and "vocabulary mismatch" in p.stderr
    # output dir not writable
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "outputs").write_text("a file where the output dir should be")
    s = spec(setup, "ro")
    p = cli("infer", s, f"run_dir={ro}")
    assert p.returncode == 8 and "is not writable" in p.stderr
    # missing model (the real command line: its exit code as a user sees it)
    p = infer(str(spec(setup, "nomodel", model="/nope")))
    assert p.returncode == 10 and "infer.model: '/nope' does not exist" in p.stderr


@pytest.mark.mpi
def test_tensor_parallel_groups_give_the_same_outputs(setup, want):
    """dp=2 x tp=2 on 4 ranks, shards to whichever group is free (the dynamic schedule): the outputs of
    one rank, written once per shard by each group's first rank. (tp=2 alone on 2 ranks:
    tests/infer/test_tensor_parallel.py, at the engine, for every family; the static schedule's split
    over groups: the test below.)"""
    p = infer(str(spec(setup, "dp2tp2", schedule="dynamic")), "parallel.tp=2", "dist.backend=torch", n=4)
    assert p.returncode == 0, p.stderr[-2000:]
    assert outputs(setup / "dp2tp2") == want
    assert "tensor-parallel group" in p.stderr and "on 4 rank(s)" in p.stderr
    assert "each shard to a tensor-parallel group of 2 ranks" in p.stderr
    writers = {json.loads(m.read_text())["rank"] for m in (setup / "dp2tp2" / "outputs").glob("*.done")}
    assert writers <= {0, 2}, writers
    bad = infer(str(spec(setup, "bad")), "parallel.tp=2", "dist.backend=torch", n=3)
    assert bad.returncode != 0 and "parallel.tp=2 does not divide the world of 3 rank(s)" in bad.stderr


def test_the_static_schedule_gives_each_tensor_parallel_group_its_shards_in_turn():
    """infer.schedule=static (and dynamic's fallback without MPI or torch.distributed): shard i to
    group i % groups, the same shards to every rank of a group, every shard to one group."""
    from types import SimpleNamespace

    from hpcllm.infer.schedule import StaticQueue

    def shards(rank, size, tp, todo):
        q = StaticQueue(SimpleNamespace(rank=rank, size=size), todo, tp)
        return list(iter(q.next, None))

    todo = [3, 5, 6, 8, 9]
    got = {r: shards(r, 6, 2, todo) for r in range(6)}
    assert got == {0: [3, 8], 1: [3, 8], 2: [5, 9], 3: [5, 9], 4: [6], 5: [6]}
    assert {r: shards(r, 2, 1, todo) for r in range(2)} == {0: [3, 6, 9], 1: [5, 8]}
