"""Stragglers (hpcllm.train.stragglers): the detector on made-up figures — the peers' median, the
threshold, persistence over log windows, one warning per episode — and a real 2-rank training run
whose rank 1 is slowed by the test hook, named with its host in the log while it runs and in
`hpcllm report`. (tests/train/test_trainer.py's 2-rank run, without the hook, names none.)"""

import json
import logging
import socket
import sys

import pytest

from hpcllm.errors import ConfigError
from hpcllm.train.stragglers import StragglerWatch, injected_delay, named_in
from tests.mpi_util import run_mpi


def test_slow_is_over_the_median_of_the_other_ranks():
    w = StragglerWatch(threshold=0.2, steps=1)
    # rank 3: 1.3 s/step against its peers' median 1.0 (the median of all four would be 1.05)
    out = w.update(10, 10, [10.0, 9.0, 11.0, 13.0], ["a", "b", "c", "d"])
    [s] = out["stragglers"]
    assert (s["rank"], s["host"], s["since_step"]) == (3, "d", 1)
    assert s["busy_s_per_step"] == pytest.approx(1.3) and s["peers_median_s_per_step"] == pytest.approx(1.0)
    assert s["over"] == pytest.approx(0.3)
    # two ranks: 1.25x the other is slow (against the median of both, 1.25 / 1.125 would not be)
    assert StragglerWatch(0.2, 1).update(1, 1, [1.0, 1.25])["stragglers"][0]["rank"] == 1
    # at the threshold is not over it; one rank has no peers
    assert StragglerWatch(0.2, 1).update(1, 1, [1.0, 1.2]) == {}
    assert StragglerWatch(0.2, 1).update(1, 1, [5.0]) == {}


def test_named_once_after_enough_consecutive_steps_then_recovers_and_is_named_again(caplog):
    w = StragglerWatch(threshold=0.2, steps=30)
    slow, even = [1.0, 1.0, 2.0], [1.0, 1.0, 1.0]
    with caplog.at_level(logging.INFO, logger="hpcllm.train"):
        assert w.update(10, 10, slow) == {}  # 10 slow steps
        assert w.update(20, 10, even) == {}  # the spell is broken: counting starts again
        assert w.update(30, 10, slow) == {} and w.update(40, 10, slow) == {}  # 20
        named = w.update(50, 10, slow)  # 30: named, slow since step 21
        assert [(s["rank"], s["since_step"], s["slow_steps"]) for s in named["stragglers"]] == [(2, 21, 30)]
        assert w.update(60, 10, slow) == {} and w.update(70, 10, slow) == {}  # the same episode: no news
        assert w.update(80, 10, even) == {"stragglers_recovered": [dict(rank=2, host=None, since_step=21,
                                                                        at_step=80)]}
        for step in (90, 100, 110):
            out = w.update(step, 10, slow)
    assert out["stragglers"][0]["since_step"] == 81  # a new episode, named again
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all(m.startswith("straggler: rank 2 on ?") for m in warnings)
    assert "since step 21" in warnings[0]
    assert "busy 0.2000 s/step, 100% over its peers' median 0.1000 s/step" in warnings[0]
    assert any("no longer slow at step 80" in r.getMessage() for r in caplog.records)


def test_only_the_leader_logs_and_episodes_read_back_from_records(caplog):
    w = StragglerWatch(threshold=0.5, steps=1, leader=False)
    with caplog.at_level(logging.INFO, logger="hpcllm.train"):
        first = w.check(5, 5, _ranks([1.0, 3.0]))
        second = w.check(10, 5, _ranks([1.0, 1.0]))
    assert not caplog.records  # every rank keeps the state, rank 0 logs
    assert first["busy_s_ranks"] == [1.0, 3.0] and first["stragglers"][0]["host"] == "h1"
    episodes = named_in([dict(step=5, **first), dict(step=10, **second)])
    assert [(e["rank"], e["named_at_step"], e["recovered_at_step"]) for e in episodes] == [(1, 5, 10)]


def _ranks(busy):
    from hpcllm.train.stragglers import RankTimes

    return [RankTimes(cpu_s=1.0, busy_s=b, host=f"h{i}") for i, b in enumerate(busy)]


def test_the_test_hook(monkeypatch):
    """HPCLLM_TEST_SLOW_RANK=R:S: rank R (every rank: *) sleeps S seconds in each step's compute."""
    monkeypatch.setenv("HPCLLM_TEST_SLOW_RANK", "1:0.05")
    assert (injected_delay(0), injected_delay(1)) == (0.0, 0.05)
    monkeypatch.setenv("HPCLLM_TEST_SLOW_RANK", "*:0.02")  # every rank (the Slurm signal tests' slow jobs)
    assert (injected_delay(0), injected_delay(1)) == (0.02, 0.02)
    monkeypatch.setenv("HPCLLM_TEST_SLOW_RANK", "one")
    with pytest.raises(ConfigError, match="HPCLLM_TEST_SLOW_RANK='one': expected RANK:SECONDS"):
        injected_delay(0)
    monkeypatch.delenv("HPCLLM_TEST_SLOW_RANK")
    assert injected_delay(1) == 0.0


@pytest.mark.mpi
def test_a_slowed_rank_is_named_with_its_host_in_the_log_and_the_report(tmp_path, small_ds):
    from hpcllm.report.report import build_report, format_report

    # rank 1 sleeps 0.1 s in each step's compute: 20x a step of this model or more. The thresholds
    # are those test_trainer.py's 2-rank run without the hook keeps quiet under: on a loaded 2-core
    # machine one rank's busy time is 2-5x the other's for a step, and for up to ~6 steps in a row
    # (measured), so 16 steps at 2x are asked for
    run = tmp_path / "run"
    spec = {"kind": "train", "name": "slow", "run_dir": str(run), "dist": {"timeout_s": 30},
            "data": {"dataset": str(small_ds)},
            "model": {"size": "custom", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64},
            "train": {"max_steps": 20, "batch_size": 2, "seq_len": 32, "log_interval": 2, "eval_interval": 0,
                      "ckpt_interval": 8, "progress": False, "stragglers": {"threshold": 1.0, "steps": 16}}}
    (tmp_path / "s.yaml").write_text(json.dumps(spec))
    p = run_mpi(2, [sys.executable, "-m", "hpcllm.cli", "train", str(tmp_path / "s.yaml")], timeout=180,
                env={"HPCLLM_TEST_SLOW_RANK": "1:0.1"})
    assert p.returncode == 0, p.stderr[-3000:]
    host = socket.gethostname()
    named = [line for line in (p.stdout + p.stderr).splitlines() if "straggler: rank" in line and "has been" in line]
    assert len(named) == 1, named  # once, not at every log line
    assert "WARNING" in named[0]
    assert f"straggler: rank 1 on {host} has been slow for 16 steps (since step 1)" in named[0]
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["busy_s_ranks"][1] >= 0.2 for r in recs)  # 2 steps x 0.1 s each window
    assert [r["step"] for r in recs if "stragglers" in r] == [16]
    assert [len(r["ckpt_s"]) for r in recs if "ckpt_s" in r] == [1, 1]  # the saves at steps 8 and 16
    rep = build_report(run, use_sacct=False)
    [episode] = rep["starts"][0]["stragglers"]
    assert (episode["rank"], episode["host"], episode["named_at_step"]) == (1, host, 16)
    assert f"straggler: rank 1 on {host} named at step 16 (slow since step 1" in format_report(rep)
