"""Provenance: what each start of a job was, appended to run_dir/provenance.jsonl by rank 0.

A start writes a `start` record when its ranks have joined (ids, versions, hashes, the checkpoint it
resumes from) and an `end` record keyed by the same start id when it leaves (finished, stopped by a
signal, crashed; per-rank CPU time and memory). A start killed outright (kill -9, node failure)
leaves no end record: the report names it killed. The batch script's last word adds a `requeued`
record when it requeues the job.

Every job kind writes these records (through hpcllm.jobs.runtime.record_start, which adds what its
spec says) and `hpcllm report` (hpcllm.report) reads them. This module imports nothing of hpcllm's
above hpcllm.errors and hpcllm.paths: the job owns its `Start`, and hands `start.id` to whatever
else records it (metrics.jsonl, the inference markers, the live metrics) — there is no "current
start" kept here.

    start = begin(run_dir, comm, kind="train", name="t1", ...)
    ...
    start.end("finished", step=100)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

from hpcllm.errors import ConfigError

FILE = "provenance.jsonl"
log = logging.getLogger("hpcllm")


def append(run_dir: str | Path, record: dict) -> None:
    """One JSON line appended, flushed and fsynced. Not hpcllm.atomic's write-and-rename: the log
    only grows, each start adds a line, and a rewrite would race a dying start's last append. A crash
    can at worst leave a torn last line, which read_records names and skips. Never through a link
    (hpcllm.paths.open_append)."""
    from hpcllm.paths import open_append

    path = Path(run_dir) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open_append(path) as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_records(run_dir: str | Path) -> tuple[list[dict], list[str]]:
    """(records, problems): every readable line, and one line naming each unreadable one."""
    path = Path(run_dir) / FILE
    records, problems = [], []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or "event" not in rec:
                raise ValueError("not a provenance record")
        except ValueError as e:
            problems.append(f"{path}:{i}: unreadable record skipped ({e})")
            continue
        records.append(rec)
    return records, problems


def sha256_file(path: str | Path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _git_commit() -> str | None:
    """The commit of the checkout hpcllm runs from (an editable install), else None."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        p = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "-uno"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (p.stdout.strip() + ("-dirty" if dirty else "")) if p.returncode == 0 else None


def versions() -> dict:
    import sys

    import torch

    from hpcllm import __version__

    out = {"hpcllm": __version__, "git": _git_commit(), "python": sys.version.split()[0], "torch": torch.__version__,
           "cuda": torch.version.cuda, "nccl": None, "mpi": None}
    try:
        if torch.cuda.is_available():
            out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:  # noqa: BLE001 - a build without NCCL: the field stays null
        pass
    try:
        from mpi4py import MPI

        out["mpi"] = MPI.Get_library_version().splitlines()[0].strip()
    except Exception:  # noqa: BLE001 - mpi4py missing or MPI unusable here
        pass
    return out


def _slurm() -> dict:
    env = os.environ
    keys = {"job_id": "SLURM_JOB_ID", "array_job_id": "SLURM_ARRAY_JOB_ID", "array_task_id": "SLURM_ARRAY_TASK_ID",
            "restart_count": "SLURM_RESTART_COUNT", "nodelist": "SLURM_JOB_NODELIST"}
    out = {k: env.get(v) for k, v in keys.items()}
    # a step started again inside the same allocation (hpcllm.launch.recover): which in-job restart,
    # and the nodes this step runs on (the job's nodelist keeps the excluded and the spare ones)
    out["in_job_restart"] = int(env.get("HPCLLM_INJOB_RESTART") or 0)
    out["step_nodelist"] = env.get("SLURM_STEP_NODELIST")
    return out


def user() -> dict:
    """Who runs this start: the uid, and its name from the passwd database — or, where the uid has
    no entry (a container started with --user), from $USER / $LOGNAME, else null."""
    import pwd

    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = os.environ.get("USER") or os.environ.get("LOGNAME") or None
    return {"name": name, "uid": uid}


def process_start_time() -> float:
    import psutil

    return psutil.Process().create_time()


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def usage() -> dict:
    """This process's CPU time and peak memory (and the GPU's, when it has one)."""
    import resource

    import torch

    out = {"cpu_s": cpu_seconds(), "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["gpu_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


class Start:
    def __init__(self, run_dir: str, start_id: str, comm, leader: bool, error: type = ConfigError):
        self.run_dir, self.id, self.comm, self.leader, self.error = run_dir, start_id, comm, leader, error
        self.ended = False

    def end(self, ending: str, gather: bool = True, **fields) -> None:
        """Write the end record. `gather`: every rank is here (a collective: per-rank usage); a
        crashed rank cannot count on its peers, so then only rank 0's usage is recorded."""
        if self.ended:
            return
        self.ended = True
        mine = dict(rank=self.comm.rank, host=socket.gethostname(), **usage())
        ranks = self.comm.allgather_object(mine) if gather else [mine]
        if self.leader:
            try:
                append(self.run_dir, dict(event="end", start=self.id, time=time.time(), ending=ending, ranks=ranks,
                                          **fields))
            except OSError as e:
                if ending == "crashed":  # the error that ended the start is on its way up: this must not hide it
                    log.warning("%s: the end record of this start was not written (%s)", Path(self.run_dir) / FILE,
                                e.strerror or e)
                    return
                raise self.error(f"{Path(self.run_dir) / FILE}: cannot record the end of this start "
                                 f"({e.strerror or e})") from None


def begin(run_dir: str, comm, error: type = ConfigError, **fields) -> Start:
    """Rank 0 appends the start record (what every start records, then `fields`: the job's own, such
    as its kind, name and spec hash); every rank learns the start id (a broadcast). A run_dir that
    cannot take the record (a full disk) is `error` (the job kind's run_dir error), in one line."""
    start_id = comm.broadcast_object(uuid.uuid4().hex[:12] if comm.rank == 0 else None)
    leader = comm.rank == 0
    if leader:
        rec = dict(event="start", start=start_id, time=time.time(), process_start=process_start_time(),
                   user=user(), host=socket.gethostname(), slurm=_slurm(), world_size=comm.size, backend=comm.name,
                   device=str(comm.device), versions=versions(), **fields)
        try:
            append(run_dir, rec)
        except OSError as e:
            raise error(f"{Path(run_dir) / FILE}: cannot record this start ({e.strerror or e})") from None
    return Start(run_dir, start_id, comm, leader, error)
