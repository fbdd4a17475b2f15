"""The checkpoint interval advice (hpcllm.report.interval): Young's and Daly's formulas against known
values and against the optimum of Daly's own goodput model, and the advice `hpcllm report` and
`hpcllm plan` print from a run's records (a run dir written here: a start killed and resumed)."""

import json
import math

import pytest

from hpcllm.report import interval


def test_young_known_value():
    # C = 60 s, M = 24 h: sqrt(2 x 60 x 86400) = 3219.9 s
    assert interval.young(60, 86400) == pytest.approx(3219.94, abs=0.01)


def test_daly_is_his_papers_expression_and_the_optimum_of_his_model():
    c, m = 60.0, 86400.0
    # Daly (2006): sqrt(2CM) [1 + 1/3 sqrt(C/2M) + 1/9 (C/2M)] - C, by hand: 3219.94 x 1.0062499 - 60
    assert interval.daly(c, m) == pytest.approx(3180.06, abs=0.01)
    for c, m in ((60.0, 86400.0), (60.0, 3600.0), (600.0, 3600.0)):
        best = interval.daly(c, m)
        grid = [best * (0.5 + i / 1000) for i in range(1001)]  # 0.5x .. 1.5x of it
        numeric = max(grid, key=lambda t: interval.goodput(t, c, m))
        assert numeric == pytest.approx(best, rel=0.002)  # the higher-order estimate is the optimum
        # Young's first-order interval is a little worse, more so as C/M grows
        assert interval.goodput(best, c, m) >= interval.goodput(interval.young(c, m), c, m)
    assert interval.daly(500, 200) == 200  # C >= 2M: Daly's tau = M


def test_goodput_model():
    # no failures to speak of: all the time is useful; an interval as long as the MTBF loses a lot
    assert interval.goodput(10, 0, 1e12) == pytest.approx(1.0)
    assert interval.goodput(3600, 60, 3600) < 0.6
    # a restart cost only lowers it: e^(-R/M)
    assert interval.goodput(600, 60, 3600, 360) == pytest.approx(interval.goodput(600, 60, 3600) * math.exp(-0.1))
    assert interval.goodput(1e9, 60, 3600) == 0.0  # overflow: nothing ever completes


def _write_run(run, node_mtbf_hours=0.0):
    """Two starts on 2 nodes: start A logs steps 5 and 10 (1 s/step), checkpoints at 10, is killed at
    step 13 and resumed from 10 by start B, which checkpoints at 20 and 30 (2 s each, in the
    records of steps 25 and 35) and finishes at 40."""
    train = {"ckpt_interval": 10, "max_steps": 40, "log_interval": 5, "node_mtbf_hours": node_mtbf_hours}
    prov = [
        dict(event="start", start="A", time=1001, process_start=1000, world_size=2, kind="train", train=train),
        dict(event="start", start="B", time=1031, process_start=1030, world_size=2, kind="train", train=train,
             resume_from={"step": 10, "path": "x"},
             previous_last_logged={"step": 13, "time": 1018, "start": "A", "cpu_s_ranks": [1.0, 1.0]}),
        dict(event="end", start="B", time=1070, ending="finished", step=40,
             ranks=[{"rank": 0, "host": "n1", "cpu_s": 9.0}, {"rank": 1, "host": "n2", "cpu_s": 9.0}]),
    ]
    metrics = [dict(step=5, time=1010, dt_s=5.0, start="A"), dict(step=10, time=1015, dt_s=5.0, start="A")]
    t = 1035.0
    for step in (15, 20, 25, 30, 35, 40):
        saves = [2.0] if step in (25, 35) else []
        t += 5 + sum(saves)
        metrics.append(dict(step=step, time=t, dt_s=5.0 + sum(saves), start="B", loss=1.0,
                            **({"ckpt_s": saves} if saves else {})))
    run.mkdir()
    (run / "provenance.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prov))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))


def test_report_advises_from_the_runs_save_time_and_failures(tmp_path):
    from hpcllm.report.report import build_report, format_report

    run = tmp_path / "run"
    _write_run(run)
    rep = build_report(run, use_sacct=False)
    adv = rep["checkpoint_interval"]
    # C: the mean stall of the two saves; one failure (A, killed and resumed) in (18 + 40) s x 2 nodes
    # of node time: 116 s per node, 58 s for the job's 2 nodes; R: A's last log (1018) to B's first step (1035)
    c, m, r = 2.0, 58.0, 17.0
    assert (adv["save_s"], adv["mtbf_s"], adv["restart_s"], adv["step_s"], adv["nodes"]) == \
        pytest.approx((c, m, r, 1.0, 2))
    x = c / (2 * m)
    tau = math.sqrt(2 * c * m) * (1 + math.sqrt(x) / 3 + x / 9) - c
    assert adv["interval_s"] == pytest.approx(tau) and adv["interval_steps"] == round(tau)
    assert adv["goodput"] == pytest.approx(tau / (m * math.exp(r / m) * (math.exp((tau + c) / m) - 1)))
    assert adv["actual"]["ckpt_interval"] == 10 and adv["actual"]["interval_s"] == pytest.approx(10.0)
    text = format_report(rep)
    assert f"optimum every {tau:.1f} s of steps = train.ckpt_interval={round(tau)} at 1 s/step" in text, text
    assert "1 failed start(s)" in text and "this run: train.ckpt_interval=10 = 10.0 s of steps" in text, text

    # a given MTBF (the last start's train.node_mtbf_hours) is taken over the estimate
    run2 = tmp_path / "run2"
    _write_run(run2, node_mtbf_hours=10.0)
    adv = build_report(run2, use_sacct=False)["checkpoint_interval"]
    assert adv["mtbf_s"] == pytest.approx(10 * 3600 / 2) and "train.node_mtbf_hours=10 per node" in adv["mtbf_source"]


def test_without_a_save_time_or_failure_the_advice_says_what_is_missing():
    adv = interval.advice_for({"save_s": None, "failures": 0, "node_s": 7200.0}, 2)
    text = "\n".join(interval.advice_lines(adv))
    assert "needs a measured save time" in text and "no failure in 2.00 node-hours" in text
    adv = interval.advice_for({"save_s": None}, 4, node_mtbf_hours=100.0)  # the MTBF alone: examples
    text = "\n".join(interval.advice_lines(adv))
    assert "job MTBF 25.00 h" in text and f"60 s -> every {interval.daly(60, 25 * 3600):.1f} s" in text


def test_plan_prints_the_advice_at_the_planned_nodes(tmp_path, capsys):
    from hpcllm.cli import main

    run = tmp_path / "run"
    _write_run(run)
    spec = tmp_path / "s.yaml"
    spec.write_text(json.dumps({"kind": "train", "name": "s", "run_dir": str(run),
                                "model": {"size": "custom", "n_layer": 2, "n_head": 2, "n_embd": 32,
                                          "block_size": 64, "vocab_size": 256},
                                "train": {"ckpt_interval": 50, "max_steps": 100},
                                "slurm": {"tasks_per_node": 2}}))
    assert main(["plan", str(spec), "--world", "8"]) == 0
    out = capsys.readouterr().out
    # 8 ranks at 2 per node: 4 nodes; the run's failure rate, 116 s per node -> 29 s for the job
    m, c = 116.0 / 4, 2.0
    assert "checkpoint interval (Young/Daly) on 4 node(s)" in out, out
    assert f"job MTBF {m:.1f} s" in out and f"optimum every {interval.daly(c, m):.1f} s" in out, out
    assert "the spec: train.ckpt_interval=50" in out and f"as measured in {run}" in out, out
