"""The summary of a run over all its starts, from run_dir/provenance.jsonl, metrics.jsonl and (for
inference) the outputs' markers, with Slurm's own accounting beside it when sacct has it. Every
figure is defined in docs/monitoring.md.

    rep = build_report("runs/x")     # a dict: `hpcllm report --json` prints it
    print(format_report(rep))
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from hpcllm.errors import HpcllmError
from hpcllm.provenance import FILE, read_records
from hpcllm.report.interval import advice_for, advice_lines, run_figures
from hpcllm.train.stragglers import describe as describe_straggler, named_in


def _starts(records: list[dict]) -> list[dict]:
    """One entry per start, in order, with its end record (or None) and whether its job was requeued:
    the batch script said so, or the same Slurm job started again (Slurm's own requeue)."""
    starts, by_id = [], {}
    for r in records:
        if r["event"] == "start":
            entry = {"start": r, "end": None, "requeued": False, "restarted_in_job": None}
            starts.append(entry)
            by_id[r["start"]] = entry
        elif r["event"] == "end" and r.get("start") in by_id:
            by_id[r["start"]]["end"] = r
        elif r["event"] in ("requeued", "requeue_failed"):  # the batch script's last word, before and
            for entry in reversed(starts):  # after scontrol; the job's latest start (array tasks interleave)
                if _job(entry) == r.get("job"):
                    entry["requeued"] = r["event"] == "requeued"
                    break
        elif r["event"] == "in_job_restart":  # hpcllm.launch.recover: the step ran again in the same allocation
            for entry in reversed(starts):
                if _job(entry) == str(r.get("job")):
                    entry["restarted_in_job"] = r
                    break
    for k, entry in enumerate(starts):
        # the same Slurm job started again with a higher restart count: Slurm requeued it (an in-job
        # restart starts the same job again with the same count)
        nxt = next((later for later in starts[k + 1:] if _job(later) == _job(entry)), None)
        if _job(entry) is not None and nxt is not None and _requeues(nxt) > _requeues(entry):
            entry["requeued"] = True
    return starts


def _requeues(entry: dict) -> int:
    return int((entry["start"].get("slurm") or {}).get("restart_count") or 0)


def _job(entry: dict) -> str | None:
    return (entry["start"].get("slurm") or {}).get("job_id")


def _job_name(entry: dict) -> str | None:
    """How Slurm names the job: an array task by ARRAY_TASK (its own job id is another number)."""
    slurm = entry["start"].get("slurm") or {}
    if slurm.get("array_job_id") and slurm.get("array_task_id") is not None:
        return f"{slurm['array_job_id']}_{slurm['array_task_id']}"
    return slurm.get("job_id")


def _ending(entry: dict) -> str:
    end, again = entry["end"], ", requeued" if entry["requeued"] else ""
    if entry["restarted_in_job"]:
        r = entry["restarted_in_job"]
        again += (f", restarted in the job ({r.get('cause')}: {r.get('why')}; excluded "
                  f"{', '.join(r.get('excluded') or []) or 'no node'}"
                  + (f", spare {', '.join(r['spares_taken'])} taken" if r.get("spares_taken") else "") + ")")
    if end is None:
        return ("killed (no end record: scancel or the time limit where SIGTERM ends the process, kill -9, a node "
                "failure or a crash the process could not report)" + again)
    if end["ending"] == "stopped":
        return f"stopped ({end.get('reason')})" + again
    if end["ending"] == "crashed":
        return f"crashed ({end.get('reason')})" + again
    return end["ending"] + again


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _read_metrics(run_dir: Path) -> list[dict]:
    from hpcllm.train.metrics import read_metrics

    return read_metrics(run_dir)


def _per_rank(end: dict | None, last_metrics: dict | None) -> list[dict]:
    """Per-rank CPU time and peak memory from the end record; for a start killed outright, the CPU
    time each rank had at `last_metrics` (`at_step`): the last record of it that has CPU times."""
    if end:
        return [{k: r.get(k) for k in ("rank", "host", "cpu_s", "peak_rss_bytes", "gpu_peak_allocated_bytes")}
                for r in end.get("ranks", [])]
    cpu = (last_metrics or {}).get("cpu_s_ranks") or []
    return [dict(rank=i, host=None, cpu_s=c, peak_rss_bytes=None, gpu_peak_allocated_bytes=None, at_step=last_metrics
                 ["step"]) for i, c in enumerate(cpu)]


def training_report(run_dir: Path, starts: list[dict]) -> dict:
    metrics = _read_metrics(run_dir)
    rows = []
    for k, entry in enumerate(starts):
        s, end = entry["start"], entry["end"]
        mine = [m for m in metrics if m.get("start") == s["start"]]
        resumed = (s.get("resume_from") or {}).get("step", 0)
        # the last step this start did: its end record says; a killed start's is the last it logged,
        # which the next start read from metrics.jsonl before truncating it to its checkpoint
        nxt = starts[k + 1]["start"] if k + 1 < len(starts) else None
        prev_seen = (nxt or {}).get("previous_last_logged") or {}
        seen_by_next = prev_seen if prev_seen.get("start") == s["start"] else {}
        last_logged = mine[-1] if mine else None
        last_step = end.get("step") if end else (seen_by_next.get("step") or (last_logged or {}).get("step"))
        last_time = end["time"] if end else (seen_by_next.get("time") or (last_logged or {}).get("time") or s["time"])
        loop_start = (mine[0]["time"] - mine[0]["dt_s"]) if mine else None
        dt = sum(m["dt_s"] for m in mine)
        # a killed start's CPU times: of the last record that has them (the next start drops the records
        # past its checkpoint, so the last one kept in metrics.jsonl may be older than the last logged)
        cpu_at = seen_by_next if seen_by_next.get("cpu_s_ranks") else last_logged
        row = dict(start=s["start"], user=s.get("user"), slurm_job=_job(entry), slurm_name=_job_name(entry),
                   restart_count=(s.get("slurm") or {}).get("restart_count"), ranks=s["world_size"],
                   ending=_ending(entry), began=s["process_start"], stopped=last_time,
                   allocated_s=last_time - s["process_start"], resumed_from_step=resumed, last_step=last_step,
                   startup_s=(loop_start - s["process_start"]) if loop_start is not None else None,
                   in_steps_s=(last_time - loop_start) if loop_start is not None else None,
                   tokens_per_s=_mean(m.get("tokens_per_s") for m in mine), mfu=_mean(m.get("mfu") for m in mine),
                   data_wait_fraction=(sum(m.get("t_data_s", 0) for m in mine) / dt) if dt else None,
                   comm_fraction=(sum(m.get("t_comm_s", 0) for m in mine) / dt) if dt else None,
                   peak_bytes_rank0=max((m.get("peak_bytes") or 0 for m in mine), default=None),
                   gpu_util_pct=_mean(m.get("gpu_util_pct") for m in mine),
                   per_rank=_per_rank(end, cpu_at))
        row["stragglers"] = named_in(mine)  # ranks named slow while it ran (hpcllm.train.stragglers)
        if k > 0:
            before = rows[-1]
            row["steps_redone"] = max(0, before["last_step"] - resumed) if before["last_step"] is not None else None
            row["recovery_s"] = (loop_start - before["stopped"]) if loop_start is not None else None
            row["in_job_restart"] = _in_job_parts(starts[k - 1]["restarted_in_job"], before, s, loop_start)
            if row["in_job_restart"]:  # the job held its nodes while it recovered: allocated, not productive
                row["in_job_restart"]["held_s"] = s["process_start"] - before["stopped"]
        rows.append(row)
    allocated = sum(r["allocated_s"] + ((r.get("in_job_restart") or {}).get("held_s") or 0) for r in rows)
    productive = sum(m["dt_s"] for m in metrics)  # the surviving records: every step once
    figures = run_figures(rows, metrics, [e["start"] for e in starts])
    return dict(kind="train", run_dir=str(run_dir), starts=rows, allocated_s=allocated, productive_step_s=productive,
                in_job_restarts=sum(1 for r in rows if r.get("in_job_restart")),
                requeues=sum(1 for e in starts if e["requeued"]),
                goodput=productive / allocated if allocated > 0 else None,
                steps_redone=sum(r.get("steps_redone") or 0 for r in rows),
                final_step=metrics[-1]["step"] if metrics else None,
                checkpoint_interval=advice_for(figures, figures["nodes"]))


def _in_job_parts(rec: dict | None, before: dict, start: dict, loop_start: float | None) -> dict | None:
    """An in-job restart's record and its recovery in parts: the failed start's last sign of life
    (its last logged step) -> the failure detected (the watchdog's report of a hung rank; srun's end
    for a death, which it sees at once) -> the step ended (teardown) -> the restart decided ->
    the new ranks started and joined (relaunch: srun, imports, rendezvous) -> the new start's first
    step began (model set-up and checkpoint load). (Not the process start time: Linux gives it to
    within a second only.)"""
    if rec is None:
        return None
    t = [before["stopped"], rec.get("detected") or rec.get("step_ended"), rec.get("step_ended"), rec.get("time"),
         start.get("time"), loop_start]
    gaps = [(b - a) if a is not None and b is not None else None for a, b in zip(t, t[1:])]
    return dict(restart=rec.get("restart"), cause=rec.get("cause"), why=rec.get("why"), excluded=rec.get("excluded"),
                spares_taken=rec.get("spares_taken"), detect_s=gaps[0], teardown_s=gaps[1], decide_s=gaps[2],
                relaunch_s=gaps[3], load_s=gaps[4])


def _read_markers(out_dir: Path, suffix: str) -> dict[str, dict]:
    """{output shard name: its .done or .begun marker}; a marker that is not JSON is named."""
    out = {}
    for p in sorted(out_dir.glob(f"out-*.h5{suffix}")):
        try:
            out[p.name[: -len(suffix)]] = json.loads(p.read_text())
        except ValueError:
            raise HpcllmError(f"{p}: not a JSON marker") from None
    return out


def _balance(busy: dict) -> float | None:
    """The slowest rank's busy time over the mean rank's (1.0: perfectly even)."""
    mean = statistics.fmean(busy.values()) if busy else 0
    return max(busy.values()) / mean if mean > 0 else None


def inference_report(run_dir: Path, starts: list[dict]) -> dict:
    out_dir = run_dir / "outputs"
    done = _read_markers(out_dir, ".done")
    begun = _read_markers(out_dir, ".begun")
    attempts = {name: [a for a in (b.get("attempts") or []) if isinstance(a, dict)] for name, b in begun.items()}
    rows = []
    for entry in starts:
        s, end = entry["start"], entry["end"]
        sid, summ = s["start"], (end or {}).get("summary") or {}
        mine = [m for m in done.values() if m.get("start") == sid]
        began = sorted(name for name, att in attempts.items() if any(a.get("start") == sid for a in att))
        finished = {name for name, m in done.items() if m.get("start") == sid}
        t1 = end["time"] if end else max([m["finished_at"] for m in mine], default=s["time"])
        tp = (s.get("plan") or {}).get("tp", 1) or 1
        busy = {r: 0.0 for r in range(0, s["world_size"], tp)}  # the ranks that write: one per tp group
        for m in mine:
            if m.get("rank") is not None:
                busy[m["rank"]] = busy.get(m["rank"], 0.0) + m["seconds"]
        seconds = summ.get("seconds")
        records = summ.get("records", sum(m.get("n_records", 0) for m in mine))
        rows.append(dict(start=sid, user=s.get("user"), slurm_job=_job(entry), slurm_name=_job_name(entry),
                         array_task=(s.get("slurm") or {}).get("array_task_id"), ranks=s["world_size"],
                         ending=_ending(entry), began=s["process_start"],
                         allocated_s=t1 - s["process_start"], shards_done=len(mine),
                         shards_skipped=summ.get("skipped_shards"), records=records, new_tokens=summ.get("new_tokens"),
                         records_per_s=records / seconds if seconds else None,
                         tokens_per_s=summ["new_tokens"] / seconds if seconds and "new_tokens" in summ else None,
                         shards_lost=[n for n in began if n not in finished],
                         rank_busy_s=busy, load_balance=_balance(busy) if mine else None))
    lat = sorted(m["seconds"] for m in done.values() if m.get("seconds") is not None)
    pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]) if lat else (lambda q: None)
    # a shard is redone when more than one start began it: the earlier ones died before its marker
    redone = {name: [a.get("start") for a in att] for name, att in sorted(attempts.items())
              if len({a.get("start") for a in att}) > 1}
    balances = [r["load_balance"] for r in rows if r["load_balance"] is not None]
    return dict(kind="infer", run_dir=str(run_dir), starts=rows, shards=len(done),
                allocated_s=sum(r["allocated_s"] for r in rows),
                shard_seconds={"min": lat[0] if lat else None, "p50": pct(0.5), "p90": pct(0.9),
                               "max": lat[-1] if lat else None, "mean": statistics.fmean(lat) if lat else None},
                shards_redone=redone, load_balance=max(balances) if balances else None)


def slurm_accounting(rep: dict, use_sacct: bool) -> dict:
    """sacct's allocations of the run's jobs and the goodput against them (training), or why not."""
    jobs = [r["slurm_job"] for r in rep["starts"] if r.get("slurm_job")]
    if not use_sacct:
        return {"available": False, "why": "--no-sacct"}
    if not jobs:
        return {"available": False, "why": "not run under Slurm"}
    from hpcllm.report.sacct import allocations

    rows, why = allocations(jobs)
    if rows is None:
        return {"available": False, "why": why}
    out = {"available": True, "allocations": rows,
           "allocated_s": sum(r["elapsed_s"] or 0 for r in rows)}
    if rep["kind"] == "train" and out["allocated_s"] > 0:
        out["goodput"] = rep["productive_step_s"] / out["allocated_s"]
    return out


def build_report(run_dir: str | Path, use_sacct: bool = True) -> dict:
    run_dir = Path(run_dir)
    if not (run_dir / FILE).is_file():
        raise HpcllmError(f"{run_dir / FILE}: no provenance records (is {run_dir} the run_dir of an hpcllm train "
                          "or infer job?)")
    records, problems = read_records(run_dir)
    starts = _starts(records)
    if not starts:
        raise HpcllmError(f"{run_dir / FILE}: no start record")
    try:
        kind = starts[0]["start"]["kind"]
        rep = inference_report(run_dir, starts) if kind == "infer" else training_report(run_dir, starts)
    except (KeyError, TypeError) as e:
        raise HpcllmError(f"{run_dir / FILE}: a record lacks field {e} (written by another hpcllm version?)") from None
    rep["slurm"] = slurm_accounting(rep, use_sacct)
    rep["problems"] = problems
    return rep


def _f(v, fmt="{:.1f}", none="-"):
    return none if v is None else fmt.format(v)


def _train_lines(i: int, r: dict) -> list[str]:
    lines = [f"      steps {r['resumed_from_step']} -> {_f(r['last_step'], '{}')}, allocated {_f(r['allocated_s'])} s, "
             f"startup {_f(r['startup_s'])} s, in steps {_f(r['in_steps_s'])} s, {_f(r['tokens_per_s'], '{:.0f}')} "
             f"tok/s, MFU {_f(r['mfu'], '{:.1%}')}, data wait {_f(r['data_wait_fraction'], '{:.1%}')}, comm "
             f"{_f(r['comm_fraction'], '{:.1%}')}" + (f", GPU util {r['gpu_util_pct']:.0f}%" if r.get("gpu_util_pct")
                                                      is not None else "")]
    if i > 0:
        lines.append(f"      restart: {_f(r.get('steps_redone'), '{}')} step(s) redone, recovery "
                     f"{_f(r.get('recovery_s'))} s (stop of start {i - 1} -> first new step)")
    ij = r.get("in_job_restart")
    if ij:
        lines.append(f"      in-job restart {ij['restart']} (no requeue, same allocation): {ij['cause']}, excluded "
                     f"{', '.join(ij['excluded'] or []) or 'no node'}; recovery parts: detection {_f(ij['detect_s'])} s, "
                     f"teardown {_f(ij['teardown_s'])} s, decision {_f(ij['decide_s'])} s, relaunch "
                     f"{_f(ij['relaunch_s'])} s, model set-up and checkpoint load {_f(ij['load_s'])} s")
    for pr in r["per_rank"]:
        mem = f", peak RSS {pr['peak_rss_bytes'] / 2**20:.1f} MB" if pr.get("peak_rss_bytes") else ""
        gpu = f", GPU peak {pr['gpu_peak_allocated_bytes'] / 2**20:.1f} MB" if pr.get("gpu_peak_allocated_bytes") else ""
        at = ""
        if pr.get("at_step") is not None:  # a killed start: when the CPU times were taken
            at = f" (at step {pr['at_step']}, its last log" + (
                ")" if pr["at_step"] == r["last_step"] else f" kept; it logged up to step {_f(r['last_step'], '{}')})")
        lines.append(f"      rank {pr['rank']}{' (' + pr['host'] + ')' if pr.get('host') else ''}: CPU "
                     f"{_f(pr['cpu_s'])} s{at}{mem}{gpu}")
    lines += [f"      {describe_straggler(e)}" for e in r.get("stragglers", [])]
    return lines


def _infer_lines(r: dict) -> list[str]:
    lines = [f"      {r['shards_done']} shard(s) done, {_f(r['shards_skipped'], '{}')} skipped as done, "
             f"{_f(r['records_per_s'])} records/s, {_f(r['tokens_per_s'], '{:.0f}')} tok/s, allocated "
             f"{_f(r['allocated_s'])} s, load balance (slowest rank / mean) {_f(r['load_balance'], '{:.2f}')}"]
    if r["shards_lost"]:
        lines.append(f"      begun and not finished (done again by a later start): {', '.join(r['shards_lost'])}")
    return lines


def _by(user: dict | None) -> str:
    """' by NAME (uid N)': who ran a start (records before hpcllm recorded it have no user)."""
    if not isinstance(user, dict):
        return ""
    return f" by {user.get('name') or '?'} (uid {user.get('uid')})"


def format_report(rep: dict) -> str:
    lines = [f"run {rep['run_dir']} ({rep['kind']}): {len(rep['starts'])} start(s)"]
    for i, r in enumerate(rep["starts"]):
        job = f"job {r.get('slurm_name') or r['slurm_job']}" if r.get("slurm_job") else "not under Slurm"
        lines.append(f"  start {i} [{r['start']}]{_by(r.get('user'))} {job}, {r['ranks']} rank(s): {r['ending']}")
        lines += _train_lines(i, r) if rep["kind"] == "train" else _infer_lines(r)
    if rep["kind"] == "train":
        lines.append(f"total: allocated {rep['allocated_s']:.1f} s, productive step time {rep['productive_step_s']:.1f} s, "
                     f"goodput {_f(rep['goodput'], '{:.1%}')}, {rep['steps_redone']} step(s) redone, final step "
                     f"{rep['final_step']}; {rep['in_job_restarts']} in-job restart(s), {rep['requeues']} requeue(s)")
        lines += advice_lines(rep["checkpoint_interval"], indent="")
    else:
        sh = rep["shard_seconds"]
        redone = ", ".join(f"{n} ({len(s)} starts)" for n, s in rep["shards_redone"].items()) or "none"
        lines.append(f"total: {rep['shards']} shard(s) done; seconds per shard min {_f(sh['min'], '{:.2f}')} p50 "
                     f"{_f(sh['p50'], '{:.2f}')} p90 {_f(sh['p90'], '{:.2f}')} max {_f(sh['max'], '{:.2f}')}; worst "
                     f"load balance {_f(rep['load_balance'], '{:.2f}')}; shards redone: {redone}")
    sl = rep["slurm"]
    if sl["available"]:
        lines.append(f"slurm (sacct): {len(sl['allocations'])} allocation(s), {sl['allocated_s']:.0f} s"
                     + (f", goodput against it {sl['goodput']:.1%}" if sl.get("goodput") is not None else ""))
    elif sl["why"] not in ("not run under Slurm", "--no-sacct"):
        lines.append(f"slurm (sacct): not available ({sl['why']})")
    lines += [f"warning: {p}" for p in rep["problems"]]
    return "\n".join(lines)
