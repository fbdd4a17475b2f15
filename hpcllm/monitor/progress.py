"""Progress read from the files a job leaves in its run dir, for the exporter (an inference job's done
markers) and for `hpcllm jobs --watch` (the live rate and ETA of each running job, from the same
figures: training's metrics.jsonl, inference's done markers)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from hpcllm.atomic import read_json_object

# `hpcllm jobs --watch`: the rate is taken over the markers of this recent a window
RATE_WINDOW_S = 600.0
TAIL_BYTES = 64 * 1024  # of metrics.jsonl: a few records whatever their size




class MarkerScan:
    """The done markers (`outputs/out-NNNNN.h5.done`, written atomically once a shard's output is
    whole) that appear for the shards of this start: one directory listing per call, each marker
    read once."""

    def __init__(self, out_dir: str | Path, todo: dict[str, int], start_id: str | None):
        self.out_dir, self.todo, self.start_id = Path(out_dir), set(todo), start_id
        self.seen: set[str] = set()

    def new_markers(self) -> list[dict]:
        try:
            names = [e.name for e in os.scandir(self.out_dir) if e.name in self.todo and e.name not in self.seen]
        except OSError:
            return []
        out = []
        for name in sorted(names):
            info = read_json_object(self.out_dir / name)
            if info is None or info.get("start") != self.start_id:  # an earlier start's: not (yet) redone
                continue
            self.seen.add(name)
            out.append(info)
        return out


# ------------------------------------------------------------------------------- jobs --watch


def eta_text(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def train_progress(run_dir: str | Path, max_steps: int | None) -> dict | None:
    """{step, max_steps, steps_per_s, eta_s} from the last two records of metrics.jsonl of the
    latest start (the rate: steps between them over the last one's interval)."""
    p = Path(run_dir) / "metrics.jsonl"
    try:  # its tail: the file grows by a record per log interval, every poll would read it whole
        with open(p, "rb") as f:
            at = f.seek(max(0, f.seek(0, os.SEEK_END) - TAIL_BYTES))
            lines = f.read().decode("utf-8", "replace").splitlines()[1 if at else 0:][-3:]  # not a cut first line
    except OSError:
        return None
    recs = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a torn last line
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            recs.append(rec)
    if not recs:
        return None
    recs = recs[-2:]
    last = recs[-1]
    rate = None
    if len(recs) == 2 and recs[0].get("start") == last.get("start") and last.get("dt_s"):
        rate = (last["step"] - recs[0]["step"]) / last["dt_s"]
    eta = (max_steps - last["step"]) / rate if rate and max_steps else None
    return dict(step=last["step"], max_steps=max_steps, steps_per_s=rate, eta_s=eta, time=last.get("time"))


def infer_progress(out_dir: str | Path, records_total: int | None, now: float | None = None) -> dict | None:
    """{records_done, records, records_per_s, eta_s} from the done markers: the rate over the
    records finished in the last RATE_WINDOW_S (from the first marker of that window to now)."""
    out_dir = Path(out_dir)
    try:
        markers = [m for m in (read_json_object(p) for p in out_dir.glob("out-*.h5.done")) if m is not None]
    except OSError:
        return None
    if not markers and records_total is None:
        return None
    now = time.time() if now is None else now
    done = sum(int(m.get("n_records", 0)) for m in markers)
    recent = sorted((float(m["finished_at"]), int(m.get("n_records", 0))) for m in markers
                    if isinstance(m.get("finished_at"), (int, float)) and now - m["finished_at"] <= RATE_WINDOW_S)
    rate = None
    if len(recent) >= 2 and now > recent[0][0]:
        rate = sum(n for _, n in recent[1:]) / (now - recent[0][0])
    eta = (records_total - done) / rate if rate and records_total is not None else None
    return dict(records_done=done, records=records_total, records_per_s=rate, eta_s=eta)


def _spec_of(run_dir: Path, kind: str):
    """The spec the job was submitted with: the newest RUN_DIR/submitit/KIND-spec-*.yaml."""
    from hpcllm.config import load_spec

    specs = sorted((run_dir / "submitit").glob(f"{kind}-spec-*.yaml"), key=lambda p: p.stat().st_mtime)
    if not specs:
        return None
    try:
        return load_spec(specs[-1])
    except Exception:  # noqa: BLE001 - a listing never fails on one run dir
        return None


def watch_line(run_dir: str | Path, kind: str) -> str:
    """`step 120/300 2.5 step/s ETA 1m12s`, `records 96/200 3.1 rec/s ETA 33s`, or "" when nothing
    is known yet."""
    run_dir = Path(run_dir)
    spec = _spec_of(run_dir, kind)
    if kind == "train":
        p = train_progress(run_dir, spec.train.max_steps if spec else None)
        if p is None:
            return ""
        rate = f" {p['steps_per_s']:.3g} step/s" if p["steps_per_s"] else ""
        eta = f" ETA {eta_text(p['eta_s'])}" if p["max_steps"] else ""
        return f"step {p['step']}/{p['max_steps'] or '?'}{rate}{eta}"
    if kind == "infer":
        total = None
        if spec is not None:
            try:
                from hpcllm.data.prompts import open_prompt_dataset

                total = sum(s.n_records for s in open_prompt_dataset(spec.infer.prompts).shards)
            except Exception:  # noqa: BLE001 - prompts not prepared yet (a chain): total unknown
                total = None
        p = infer_progress(run_dir / "outputs", total)
        if p is None:
            return ""
        rate = f" {p['records_per_s']:.3g} rec/s" if p["records_per_s"] else ""
        eta = f" ETA {eta_text(p['eta_s'])}" if p["records"] is not None else ""
        return f"records {p['records_done']}/{p['records'] if p['records'] is not None else '?'}{rate}{eta}"
    return ""
