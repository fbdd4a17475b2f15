"""One job per run_dir (hpcllm.jobs.lock): a second job is refused with exit 11 naming the holder, on
every rank; a lock whose holder died is taken over; the tasks of an inference job array share one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpcllm.errors import RunDirBusy
from hpcllm.jobs.lock import LOCK_FILE, RunDirLock
from tests.mpi_util import REPO, mpi_env, run_mpi

_HOLD = """
import os, sys
from hpcllm.jobs.lock import RunDirLock
lock = RunDirLock(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
lock.acquire()
print("held", flush=True)
if sys.argv[5] == "die":
    os._exit(0)  # no release: as a job killed outright
sys.stdin.read()
lock.release()
"""


class Holder:
    """A process holding a run_dir's lock (its share: task of tasks) until close()."""

    def __init__(self, run_dir: Path, kind="train", task=0, tasks=1, then="hold"):
        env = {**mpi_env(), "SLURM_JOB_ID": "4242"}
        self.proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir), kind, str(task), str(tasks), then],
                                     env=env, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"
        self.pid = self.proc.pid

    def close(self):
        self.proc.communicate(timeout=30)


def spec(tmp_path: Path, kind: str) -> Path:
    """A job spec whose inputs exist (empty dirs: a refused job never reads them)."""
    (tmp_path / "in").mkdir(exist_ok=True)
    body = {"kind": kind, "name": "busy", "run_dir": str(tmp_path / "run")}
    if kind == "train":
        body["data"] = {"dataset": str(tmp_path / "in")}
    else:
        body["infer"] = {"prompts": str(tmp_path / "in"), "model": str(tmp_path / "in")}
    p = tmp_path / f"{kind}.yaml"
    p.write_text(json.dumps(body))
    return p


def test_a_second_job_on_a_held_run_dir_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = Holder(run)
    try:
        p = subprocess.run([sys.executable, "-m", "hpcllm.cli", "train", str(spec(tmp_path, "train"))],
                           capture_output=True, text=True, timeout=120, env=mpi_env())
    finally:
        holder.close()
    assert p.returncode == 11, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    holder_named = f"an hpcllm train job on host {os.uname().nodename}, pid {holder.pid}, Slurm job 4242"
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"hpcllm train: error: run_dir {run} is in use by {holder_named}"), lines
    # nothing of the refused job in the holder's run_dir
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE, "logs"] and not list((run / "logs").iterdir())


def test_a_lock_left_by_a_dead_process_is_taken_over_naming_it(tmp_path):
    dead = Holder(tmp_path, then="die")
    dead.close()
    lock = RunDirLock(tmp_path, "train")
    notes = lock.acquire()
    assert len(notes) == 1 and f"pid {dead.pid}, Slurm job 4242" in notes[0] and "which is gone" in notes[0], notes
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # a clean end: nothing left to take over
    again = RunDirLock(tmp_path, "train")
    assert again.acquire() == []
    again.release()


def test_the_tasks_of_an_inference_array_share_the_run_dir_and_nothing_else_does(tmp_path):
    task0 = Holder(tmp_path, "infer", 0, 2)
    try:
        other = RunDirLock(tmp_path, "infer", 1, 2)  # the array's other task runs beside it
        assert other.acquire() == []
        other.release()
        with pytest.raises(RunDirBusy, match=f"array task 0 of 2 is already running there, as an hpcllm infer "
                                             f"job .* pid {task0.pid}"):
            RunDirLock(tmp_path, "infer", 0, 2).acquire()  # the same task twice
        with pytest.raises(RunDirBusy, match=f"in use by the tasks of an inference job array .*pid {task0.pid}"):
            RunDirLock(tmp_path, "train").acquire()  # a whole-run_dir job beside the array
    finally:
        task0.close()
    whole = Holder(tmp_path, "infer")
    try:
        with pytest.raises(RunDirBusy, match=f"in use by an hpcllm infer job .*pid {whole.pid}.* so array task 1 of 2"):
            RunDirLock(tmp_path, "infer", 1, 2).acquire()
    finally:
        whole.close()


def test_a_requeued_job_waits_for_its_own_previous_start_to_let_go(tmp_path, monkeypatch):
    # Slurm starts a requeued job again while its previous start's ranks may still be exiting: the
    # lock of the same Slurm job is waited for, not refused
    import threading
    import time

    previous = Holder(tmp_path)  # Slurm job 4242
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    threading.Timer(1.0, previous.close).start()
    t0 = time.monotonic()
    lock = RunDirLock(tmp_path, "train")
    assert lock.acquire() == [] and time.monotonic() - t0 >= 0.9
    lock.release()
    # another job's lock is refused at once, however long the wait for one's own would be
    other = Holder(tmp_path)
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "4343")
        t0 = time.monotonic()
        with pytest.raises(RunDirBusy, match="Slurm job 4242"):
            RunDirLock(tmp_path, "train").acquire()
        assert time.monotonic() - t0 < 5
    finally:
        other.close()


@pytest.mark.mpi
def test_the_refusal_reaches_every_rank(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = Holder(run, "infer")
    try:
        p = run_mpi(2, [sys.executable, "-m", "hpcllm.cli", "infer", str(spec(tmp_path, "infer"))], timeout=120)
    finally:
        holder.close()
    assert p.returncode == 11, p.stderr[-3000:]
    for rank in (0, 1):
        assert f"hpcllm infer: error (rank {rank}): run_dir {run} is in use by an hpcllm infer job on host " in p.stderr
    assert p.stderr.count(f"pid {holder.pid}, Slurm job 4242") == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
