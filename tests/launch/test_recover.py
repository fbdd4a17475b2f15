"""hpcllm.launch.recover's decision without Slurm (scontrol's answers stubbed): which node a failed
step's cause names, spares before shrinking, and every refusal in one line. The real thing, on the
local 2-node cluster: tests/launch/test_restart.py."""

from __future__ import annotations

import json

import pytest

from hpcllm.config import load_spec
from hpcllm.launch import recover
from hpcllm.launch.recover import NoRestart, decide, srun_options

JOB = "4242"


@pytest.fixture
def cluster(monkeypatch):
    """The job's allocation and node states, as scontrol would give them."""
    state = {"alloc": ["n1", "n2", "n3"], "down": set()}
    monkeypatch.setattr(recover, "allocation", lambda job: list(state["alloc"]))
    monkeypatch.setattr(recover, "node_state", lambda n: "DOWN+NOT_RESPONDING" if n in state["down"] else "ALLOCATED")
    monkeypatch.setattr("hpcllm.launch.finish.controller_state", lambda job: state.get("job_state", "RUNNING"))
    return state


def make_spec(tmp_path, nodes=2, spare=0, tasks=1, global_batch=4, max_restarts=2, batch=1):
    spec = {"kind": "train", "name": "r", "run_dir": str(tmp_path / "run"), "data": {"dataset": str(tmp_path)},
            "train": {"max_steps": 10, "batch_size": batch, "global_batch_size": global_batch},
            "slurm": {"nodes": nodes, "spare_nodes": spare, "tasks_per_node": tasks, "max_restarts": max_restarts}}
    p = tmp_path / "spec.yaml"
    p.write_text(json.dumps(spec))
    return load_spec(p)


def step(spec, nodes):
    return srun_options(nodes, spec.slurm.tasks_per_node)


def test_a_killed_task_excludes_its_node_and_a_spare_replaces_it(tmp_path, cluster):
    spec = make_spec(tmp_path, nodes=2, spare=1)
    log = ("srun: error: n1: task 0: Exited with exit code 4\n"  # taken down by the death below: not the cause
           "srun: error: n2: task 1: Killed\nsrun: error: n1: task 0: Killed\n")
    n, options, rec = decide(spec, JOB, "0", 137, step(spec, ["n1", "n2"]), log, 0.0, 1.0)
    assert (n, rec["cause"], rec["excluded"], rec["spares_taken"]) == (1, "killed", ["n2"], ["n3"])
    assert options == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--nodelist=n1,n3"]
    assert "a rank on n2 died: Killed" in rec["why"]


def test_a_hung_rank_named_by_the_watchdog_and_a_lost_node(tmp_path, cluster):
    spec = make_spec(tmp_path, nodes=3, tasks=2, global_batch=8)
    logs = tmp_path / "run" / "logs"
    logs.mkdir(parents=True)
    reports = [{"time": 0.5, "job": JOB, "missing": [5]},  # before this step launched: an earlier step's
               {"time": 5.0, "job": "999", "missing": [0]},  # another job's
               {"time": 5.0, "job": JOB, "missing": [3], "behind": []}]
    (logs / recover.FAULT_FILE).write_text("\n".join(map(json.dumps, reports)) + "\n{torn")
    _, options, rec = decide(spec, JOB, "0", 4, step(spec, ["n1", "n2", "n3"]), "", 1.0, 6.0)
    assert (rec["cause"], rec["excluded"], rec["world_size"]) == ("hung", ["n2"], 4)  # rank 3 of 2 a node: n2
    assert options[-1] == "--nodelist=n1,n3" and "rank(s) 3 did not arrive" in rec["why"]
    (logs / recover.FAULT_FILE).unlink()
    cluster["down"].add("n3")
    _, _, rec = decide(spec, JOB, "0", 1, step(spec, ["n1", "n2", "n3"]), "", 1.0, 6.0)
    assert (rec["cause"], rec["excluded"]) == ("lost", ["n3"]) and "n3 DOWN" in rec["why"]


def test_refusals_are_one_line_each(tmp_path, cluster):
    cluster["alloc"] = ["n1", "n2"]  # no spare: the world would shrink
    spec = make_spec(tmp_path, nodes=2, global_batch=0)
    killed = "srun: error: n2: task 1: Killed\n"
    with pytest.raises(NoRestart, match="train.global_batch_size is not set"):  # shrinking would change the batch
        decide(spec, JOB, "0", 137, step(spec, ["n1", "n2"]), killed, 0.0, 1.0)
    cluster["alloc"] = ["n1", "n2", "n3"]
    spec = make_spec(tmp_path, nodes=3, global_batch=6, batch=2)  # 3 ranks x 2 divide 6, 2 ranks x 2 do not
    with pytest.raises(NoRestart, match="global_batch_size=6 is not a multiple of 2"):
        decide(spec, JOB, "0", 137, step(spec, ["n1", "n2", "n3"]), killed, 0.0, 1.0)
    cluster["alloc"] = ["n1", "n2"]
    spec = make_spec(tmp_path, nodes=2)
    cluster["job_state"] = "COMPLETING"  # scancel, scontrol requeue, the time limit
    with pytest.raises(NoRestart, match="the job is COMPLETING: Slurm is ending it"):
        decide(spec, JOB, "0", 137, step(spec, ["n1", "n2"]), killed, 0.0, 1.0)
    cluster["job_state"] = "RUNNING"
    with pytest.raises(NoRestart, match="exit 85"):
        decide(spec, JOB, "0", 85, step(spec, ["n1", "n2"]), killed, 0.0, 1.0)
    with pytest.raises(NoRestart, match="neither the watchdog, nor the nodes' states, nor srun"):
        decide(spec, JOB, "0", 1, step(spec, ["n1", "n2"]), "srun: error: n1: task 0: Exited with exit code 1\n",
               0.0, 1.0)
    # a rank that failed on its own (here a bad checkpoint): its peer's watchdog then names it, but no node is to blame
    (tmp_path / "run" / "logs").mkdir(parents=True, exist_ok=True)
    (tmp_path / "run" / "logs" / recover.FAULT_FILE).write_text(json.dumps({"time": 5, "job": JOB, "missing": [1]}))
    with pytest.raises(NoRestart, match=r"on n2, exited with status 6 \(bad checkpoint\): the program failed"):
        decide(spec, JOB, "0", 6, step(spec, ["n1", "n2"]), "srun: error: n2: task 1: Exited with exit code 6\n"
               "srun: error: n1: task 0: Exited with exit code 4\n", 0.0, 9.0)
    (tmp_path / "run" / "logs" / recover.FAULT_FILE).unlink()
    with pytest.raises(NoRestart, match="not a plain host name"):
        decide(spec, JOB, "0", 137, ["--nodelist=n1,n2;reboot"], killed, 0.0, 1.0)
    # the limit counts this start's in-job restarts (a requeued start has its own)
    from hpcllm.provenance import append

    for k in (1, 2):
        append(spec.run_dir, {"event": "in_job_restart", "job": JOB, "requeue": 0, "restart": k, "excluded": ["n3"]})
    with pytest.raises(NoRestart, match="2 in-job restart.*max_restarts=2"):
        decide(spec, JOB, "0", 137, step(spec, ["n1", "n2"]), killed, 0.0, 1.0)
    n, _, rec = decide(spec, JOB, "1", 137, step(spec, ["n1", "n2"]), killed, 0.0, 1.0)
    assert n == 1 and rec["nodes"] == ["n1"]


def test_cli_plan_outside_a_job_leaves_the_step_alone(tmp_path, monkeypatch, capsys):
    spec = make_spec(tmp_path, nodes=1)
    (tmp_path / "s.yaml").write_text(json.dumps({"kind": "train", "name": "r", "run_dir": spec.run_dir,
                                                 "data": {"dataset": str(tmp_path)}}))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert recover.main([str(tmp_path / "s.yaml"), "plan"]) == 0
    assert capsys.readouterr().out == "0\n"
    assert recover.main([str(tmp_path / "s.yaml"), "next", "--status", "137", "--", "--nodelist=n1"]) == 1
    assert "no in-job restart: not inside a Slurm job" in capsys.readouterr().err
