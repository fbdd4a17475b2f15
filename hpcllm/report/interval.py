"""The checkpoint interval that maximises goodput, from the time a checkpoint costs and the mean time
between failures — the advice `hpcllm plan` and `hpcllm report` print. Pure arithmetic on figures
read from a run's records: no torch.

    C  the save time: the seconds the training loop stands still for one checkpoint (the trainer's
       `ckpt_s` in metrics.jsonl: every rank writes its part, so this is the stall, whatever the
       checkpoint's size)
    M  the job's mean time between failures. Failures are taken per node and independent, so a job
       on N nodes fails N times as often: M = train.node_mtbf_hours / N. Without that field M comes
       from the run's own history: the starts that failed (crashed, or killed and followed by a
       later start; the last start may still be running and is not counted) in the node-seconds the
       run's starts were allocated (allocated seconds x nodes), which gives a per-node figure too
    R  the restart time (failure to first new step): the run's measured recovery times, else its
       first start's startup
    τ  the compute time between two checkpoints (train.ckpt_interval x the step time)

Young (1974, "A first order approximation to the optimum checkpoint interval", CACM 17(9)):
τ = sqrt(2 C M). Daly (2006, "A higher order estimate of the optimum checkpoint interval for restart
dumps", Future Generation Computer Systems 22(3)): τ = sqrt(2 C M) [1 + 1/3 sqrt(C / 2M) + 1/9 (C / 2M)] - C for C < 2M,
else τ = M — Young's as its first term. The goodput predicted for an interval is Daly's model of the
expected wall time (failures exponential, possible during saves and restarts too): useful
time / wall time = τ / (M e^(R/M) (e^((τ+C)/M) - 1)).
"""

from __future__ import annotations

import math
import statistics


def young(save_s: float, mtbf_s: float) -> float:
    """Young's optimum compute time between checkpoints, seconds."""
    return math.sqrt(2 * save_s * mtbf_s)


def daly(save_s: float, mtbf_s: float) -> float:
    """Daly's higher-order optimum compute time between checkpoints, seconds."""
    if save_s >= 2 * mtbf_s:
        return mtbf_s
    x = save_s / (2 * mtbf_s)
    return young(save_s, mtbf_s) * (1 + math.sqrt(x) / 3 + x / 9) - save_s


def goodput(interval_s: float, save_s: float, mtbf_s: float, restart_s: float = 0.0) -> float:
    """The fraction of the wall time spent on steps that count, under Daly's model, with a
    checkpoint after every `interval_s` seconds of steps."""
    if interval_s <= 0:
        return 0.0
    m = mtbf_s
    try:
        return interval_s / (m * math.exp(restart_s / m) * math.expm1((interval_s + save_s) / m))
    except OverflowError:  # an interval of hundreds of MTBFs: nothing ever completes
        return 0.0


def advise(save_s: float, mtbf_s: float, restart_s: float = 0.0, step_s: float | None = None,
           interval_steps: int | None = None, run_steps: int | None = None) -> dict:
    """The optimum interval and its predicted goodput; in steps when the step time is known; and the
    goodput of `interval_steps` (train.ckpt_interval; 0: no periodic checkpoint, a failure loses the
    whole run of `run_steps`) beside it."""
    best = daly(save_s, mtbf_s)
    out = dict(save_s=save_s, mtbf_s=mtbf_s, restart_s=restart_s, step_s=step_s, interval_s=best,
               young_s=young(save_s, mtbf_s), goodput=goodput(best, save_s, mtbf_s, restart_s),
               interval_steps=max(1, round(best / step_s)) if step_s else None)
    if interval_steps is not None and step_s:
        steps = interval_steps or run_steps
        if steps:
            out["actual"] = dict(ckpt_interval=interval_steps, interval_s=steps * step_s,
                                 goodput=goodput(steps * step_s, save_s, mtbf_s, restart_s))
    return out


def _start_train(start: dict) -> dict:
    return start.get("train") or {}


def run_figures(rows: list[dict], metrics: list[dict], start_records: list[dict]) -> dict:
    """What a run's records say for the advice: the mean save stall, the median step time, the
    restart time, the failures and node-seconds of its starts, its nodes, and the last start's
    train.ckpt_interval and train.node_mtbf_hours (recorded in its start record)."""
    saves = [s for m in metrics for s in (m.get("ckpt_s") or [])]
    per_step, prev = [], None
    for m in metrics:  # a log window's seconds per step, less its checkpoints; not across starts
        if prev is not None and prev.get("start") == m.get("start") and m["step"] > prev["step"]:
            per_step.append((m["dt_s"] - sum(m.get("ckpt_s") or [])) / (m["step"] - prev["step"]))
        prev = m
    recoveries = [r["recovery_s"] for r in rows if r.get("recovery_s") is not None]
    startup = next((r["startup_s"] for r in rows if r.get("startup_s") is not None), None)
    hosts = {pr["host"] for r in rows for pr in r.get("per_rank", []) if pr.get("host")}
    failed = [r for k, r in enumerate(rows) if r["ending"].startswith("crashed")
              or (r["ending"].startswith("killed") and k + 1 < len(rows))]
    last = _start_train(start_records[-1]) if start_records else {}
    nodes = max(1, len(hosts))
    return dict(save_s=statistics.fmean(saves) if saves else None, saves=len(saves),
                step_s=statistics.median(per_step) if per_step else None,
                restart_s=statistics.fmean(recoveries) if recoveries else startup,
                failures=len(failed), node_s=sum(r["allocated_s"] for r in rows) * nodes, nodes=nodes,
                ckpt_interval=last.get("ckpt_interval"), max_steps=last.get("max_steps"),
                node_mtbf_hours=last.get("node_mtbf_hours") or None)


def advice_for(fig: dict, nodes: int, node_mtbf_hours: float | None = None) -> dict:
    """The advice at `nodes` nodes from a run's figures (`run_figures`), with the per-node MTBF
    given (`node_mtbf_hours`, else the run's field) or estimated from its failures. Without a save
    time or a failure rate: what is missing (`missing`)."""
    given = node_mtbf_hours or fig.get("node_mtbf_hours")
    if given:
        node_mtbf_s, source = given * 3600, f"train.node_mtbf_hours={given:g} per node"
    elif fig.get("failures"):
        node_mtbf_s = fig["node_s"] / fig["failures"]
        source = (f"estimated: {fig['failures']} failed start(s) in {fig['node_s'] / 3600:.2f} node-hours of this run "
                  f"= {_dur(node_mtbf_s)} per node")
    else:
        node_mtbf_s, source = None, None
    out = dict(nodes=nodes, mtbf_source=source, figures=fig)
    missing = []
    if fig.get("save_s") is None:
        missing.append("a measured save time (metrics.jsonl's ckpt_s: a run that checkpointed at train.ckpt_interval)")
    if node_mtbf_s is None:
        missing.append("a failure rate (train.node_mtbf_hours"
                       + (f"; the run's starts had no failure in {fig['node_s'] / 3600:.2f} node-hours)"
                          if fig.get("node_s") else ", or a run whose starts failed)"))
    mtbf_s = node_mtbf_s / nodes if node_mtbf_s else None
    if missing:
        # the failure rate alone: the optimum for a few save times, until one is measured
        examples = {c: daly(c, mtbf_s) for c in (10.0, 60.0, 300.0)} if mtbf_s else {}
        return dict(out, missing=missing, mtbf_s=mtbf_s, examples=examples)
    return dict(out, **advise(fig["save_s"], mtbf_s, fig.get("restart_s") or 0.0, fig.get("step_s"),
                              fig.get("ckpt_interval"), fig.get("max_steps")))


def _dur(s: float) -> str:
    return f"{s / 3600:.2f} h" if s >= 3600 else f"{s:.1f} s" if s >= 1 else f"{s:.3f} s"


def advice_lines(adv: dict, indent: str = "  ", this: str = "this run") -> list[str]:
    """The advice as text (`hpcllm report`; `hpcllm plan` with `this` = "the spec")."""
    head = f"checkpoint interval (Young/Daly) on {adv['nodes']} node(s): "
    if adv.get("missing"):
        lines = [indent + head + "needs " + " and ".join(adv["missing"])]
        if adv.get("examples"):
            lines.append(f"{indent}  with job MTBF {_dur(adv['mtbf_s'])} ({adv['mtbf_source']}, / {adv['nodes']} "
                         "node(s)), a save of " + ", ".join(f"{c:g} s -> every {_dur(t)}"
                                                          for c, t in adv["examples"].items()) + " of steps")
        return lines
    fig = adv["figures"]
    lines = [indent + head + f"save {_dur(adv['save_s'])} (mean of {fig['saves']}), job MTBF {_dur(adv['mtbf_s'])} "
             f"({adv['mtbf_source']}, / {adv['nodes']} node(s)), restart {_dur(adv['restart_s'])}"]
    if adv.get("interval_steps"):
        every = (f"every {_dur(adv['interval_s'])} of steps = train.ckpt_interval={adv['interval_steps']} at "
                 f"{adv['step_s']:.4g} s/step")
    else:
        every = (f"every {_dur(adv['interval_s'])} of steps (no step time measured: train.ckpt_interval = that / "
                 "seconds per step)")
    lines.append(f"{indent}  optimum {every} (Young's sqrt(2 x save x MTBF): {_dur(adv['young_s'])}); predicted "
                 f"goodput {adv['goodput']:.1%}")
    act = adv.get("actual")
    if act:
        what = (f"train.ckpt_interval={act['ckpt_interval']}" if act["ckpt_interval"] else
                "train.ckpt_interval=0 (no periodic checkpoint: a failure redoes the whole run)")
        ratio = act["interval_s"] / adv["interval_s"]
        verdict = ("about right" if 0.5 <= ratio <= 2 else
                   "checkpoints too often" if ratio < 0.5 else "checkpoints too rarely")
        lines.append(f"{indent}  {this}: {what} = {_dur(act['interval_s'])} of steps: predicted goodput "
                     f"{act['goodput']:.1%} ({verdict})")
    return lines
