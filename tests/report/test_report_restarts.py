"""`hpcllm report` on a run with an in-job restart and a requeue (records written here, as the
jobs write them): the in-job restart is not counted as a requeue, its recovery is given in parts,
and a requeue of the same job (a higher SLURM_RESTART_COUNT) still is one. The real run:
tests/launch/test_restart.py."""

import json

from hpcllm.report.report import build_report, format_report


def start(sid, t, restart_count, in_job, world, resume=0):
    return {"event": "start", "start": sid, "time": t, "process_start": t - 3, "world_size": world, "kind": "train",
            "slurm": {"job_id": "77", "restart_count": restart_count, "in_job_restart": in_job},
            "resume_from": {"step": resume} if resume else None}


def steps(sid, first, last, t0):
    return [{"start": sid, "step": s, "time": t0 + (s - first + 1), "dt_s": 1.0, "loss": 1.0}
            for s in range(first, last + 1)]


def test_in_job_restart_and_requeue_are_told_apart(tmp_path):
    recs = [start("a", 100.0, None, 0, 2),
            {"event": "in_job_restart", "job": "77", "requeue": 0, "restart": 1, "cause": "hung",
             "why": "rank(s) 1 did not arrive at a collective (named by the watchdog) on n2", "excluded": ["n2"],
             "spares_taken": [], "nodes": ["n1"], "world_size": 1, "detected": 113.0, "step_ended": 113.5,
             "time": 114.0},
            start("b", 118.0, None, 1, 1, resume=10),
            {"event": "requeued", "job": "77", "restart": 0, "time": 140.0},
            start("c", 160.0, "1", 0, 1, resume=20),
            {"event": "end", "start": "c", "time": 175.0, "ending": "finished", "step": 30, "ranks": []}]
    (tmp_path / "provenance.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    metrics = steps("a", 1, 10, 100.0) + steps("b", 11, 20, 120.0) + steps("c", 21, 30, 162.0)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    rep = build_report(tmp_path, use_sacct=False)
    assert (rep["in_job_restarts"], rep["requeues"]) == (1, 1)
    a, b, c = rep["starts"]
    assert "requeued" not in a["ending"] and "restarted in the job (hung:" in a["ending"]
    assert "requeued" in b["ending"] and c["in_job_restart"] is None
    ij = b["in_job_restart"]
    # last step of a at 110 -> watchdog 113 -> step ended 113.5 -> decided 114 -> ranks joined 118 -> first step 120
    assert (ij["detect_s"], ij["teardown_s"], ij["decide_s"], ij["relaunch_s"], ij["load_s"]) == (3.0, 0.5, 0.5, 4.0,
                                                                                                2.0)
    assert b["recovery_s"] == 10.0
    # allocated: each start's (13 + 15 + 18 s) and the 5 s the job held its nodes between a's last step
    # and b's process (an in-job restart); the requeue's queue wait (b -> c) is not allocated
    assert rep["allocated_s"] == 51.0 and rep["goodput"] == 30 / 51
    text = format_report(rep)
    assert "in-job restart 1 (no requeue, same allocation): hung, excluded n2; recovery parts: detection 3.0 s" in text
    assert "1 in-job restart(s), 1 requeue(s)" in text
