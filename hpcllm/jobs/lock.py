"""One job per run_dir: rank 0 of a training or inference job holds a lock in its run_dir for the
job's lifetime, and a second job on the same run_dir is refused (RunDirBusy, exit 11) in one line
naming the holder. Two trainings on one run_dir would otherwise interleave: both write step_N.tmp,
metrics.jsonl mixes, and one's checkpoint rotation deletes the other's checkpoints.

    run_dir/.hpcllm.lock                   the whole run_dir: a training job, a plain inference job
    run_dir/.hpcllm-task-I-of-N.lock       task I of an N-task inference job array

The tasks of an inference job array share one output dir by design (task I writes the shards
s with s % N == I): each holds its own task's file exclusively and `.hpcllm.lock` shared, so the
tasks run side by side while the same task twice, a plain job, or a training are refused. A lock
file holds its holder as JSON (host, pid, Slurm job, kind, start time) while it is held.

The lock is the kernel's, not the file's existence: it goes with the holder's process however that
ends (an error, kill -9, a Slurm requeue), so a lock file whose holder is gone is simply taken over
— with a log line naming that holder, whose record is still there because it did not end cleanly
(release() empties it).

Why fcntl.lockf (POSIX record locks) rather than flock(2): POSIX locks are the ones NFS carries to
the server (NLM for NFSv3, part of the protocol in NFSv4), so jobs on two nodes see each other's
lock; Linux emulates flock with them on NFS anyway, and Lustre serves either cluster-wide when
mounted with `-o flock`. Their catch: a POSIX lock belongs to the process and is dropped when the
process closes *any* descriptor of the file — so each lock file is opened once, here, and kept open
while held. A filesystem that has no locks at all (NFS without lockd, Lustre mounted without
`flock`) leaves the job unlocked, with a warning.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from hpcllm.errors import HpcllmError, RunDirBusy

LOCK_FILE = ".hpcllm.lock"

# what a filesystem without POSIX locks answers
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def task_lock_file(task: int, tasks: int) -> str:
    return f".hpcllm-task-{task}-of-{tasks}.lock"


def holder_record(kind: str) -> dict:
    env = os.environ
    job = env.get("SLURM_JOB_ID")
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": job, "kind": kind, "since": time.time()}


def describe(rec: dict | None) -> str:
    if not rec:
        return "another job (which has not recorded itself yet)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.get("since", 0)))
    job = f"Slurm job {rec['slurm_job']}" if rec.get("slurm_job") else "not a Slurm job"
    return f"an hpcllm {rec.get('kind', '?')} job on host {rec.get('host')}, pid {rec.get('pid')}, {job}, since {since}"


def _busy(message: str, holder: dict | None) -> RunDirBusy:
    """RunDirBusy, marked `same_job` when the holder is this Slurm job's own previous start."""
    e = RunDirBusy(message)
    mine = holder_record("")["slurm_job"]
    e.same_job = bool(mine) and bool(holder) and holder.get("slurm_job") == mine
    return e


class _LockFile:
    """One lock file, opened once (see the module's note on POSIX locks)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self.exclusive = False

    def try_lock(self, shared: bool) -> bool:
        """Take the lock without waiting; False when another process holds it."""
        try:
            fcntl.lockf(self.fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB, 0, 0, os.SEEK_SET)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        self.exclusive = not shared
        return True

    def unlock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 0, 0, os.SEEK_SET)

    def read(self) -> dict | None:
        """The holder's record; None when empty or half-written (a holder that is just starting)."""
        try:
            data = os.pread(self.fd, 4096, 0)
            rec = json.loads(data) if data.strip() else None
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) else None

    def write(self, rec: dict) -> None:
        data = json.dumps(rec).encode() + b"\n"
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        os.fsync(self.fd)

    def close(self) -> None:
        if self.exclusive:  # a clean end leaves no record: only a holder that died leaves one to name
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
        os.close(self.fd)  # drops the lock


class RunDirLock:
    """The lock a job holds on its run_dir (its share of it: task `task` of `tasks`), in one process."""

    def __init__(self, run_dir: str | os.PathLike, kind: str, task: int = 0, tasks: int = 1,
                 error: type = HpcllmError):
        self.run_dir, self.kind, self.task, self.tasks = Path(run_dir), kind, task, tasks
        self.error = error  # for a lock file that cannot be opened at all
        self._files: list[_LockFile] = []

    def acquire(self, wait_same_job_s: float = 60.0) -> list[str]:
        """Take the lock, or raise RunDirBusy naming the holder. Returns the lines to log: a previous
        holder that is gone, or a filesystem without locks. A holder of this very Slurm job (its
        previous start, requeued: Slurm starts the new one while the old ranks may still be exiting,
        a few seconds after sacct's End) is waited for, up to `wait_same_job_s`."""
        deadline, tries = time.monotonic() + wait_same_job_s, 0
        while True:
            try:
                return self._acquire_or_raise()
            except RunDirBusy as e:
                tries += 1
                # one more try at once: the holder may have let go between our try and our look at it
                if tries > 1 and (not getattr(e, "same_job", False) or time.monotonic() > deadline):
                    raise
                time.sleep(0.5 if tries > 1 else 0.05)

    def _acquire_or_raise(self) -> list[str]:
        try:
            return self._acquire()
        except OSError as e:
            self.release()
            if e.errno in _NO_LOCKS:
                return [f"run_dir {self.run_dir} is on a filesystem without file locks ({e.strerror}): hpcllm "
                        "cannot keep a second job off it — start only one job per run_dir"]
            raise self.error(f"run_dir {self.run_dir}: cannot lock {e.filename or self.run_dir / LOCK_FILE} "
                             f"({e.strerror or e}): choose another run_dir") from None
        except BaseException:
            self.release()
            raise

    def _acquire(self) -> list[str]:
        whole = self._open(LOCK_FILE)
        if self.tasks == 1:
            holder = whole.read()  # before trying: a holder that lets go meanwhile empties its record
            if not whole.try_lock(shared=False):
                raise _busy(f"run_dir {self.run_dir} is in use by {self._holder_of_whole(whole)}: one job "
                            "per run_dir (wait for it to end, or choose another run_dir)", holder)
            mine = whole
        else:
            if not whole.try_lock(shared=True):
                raise RunDirBusy(f"run_dir {self.run_dir} is in use by {describe(whole.read())}, so array task "
                                 f"{self.task} of {self.tasks} cannot use it: one job per run_dir")
            mine = self._open(task_lock_file(self.task, self.tasks))
            holder = mine.read()
            if not mine.try_lock(shared=False):
                raise _busy(f"run_dir {self.run_dir}: array task {self.task} of {self.tasks} is already "
                            f"running there, as {describe(mine.read() or holder)}", holder)
        notes = []
        gone = mine.read()
        if gone:
            notes.append(f"took over the lock {mine.path} from {describe(gone)}, which is gone (it ended without "
                         "releasing it)")
        mine.write(holder_record(self.kind))
        return notes

    def _open(self, name: str) -> _LockFile:
        f = _LockFile(self.run_dir / name)
        self._files.append(f)
        return f

    def _holder_of_whole(self, whole: _LockFile) -> str:
        """Who keeps `whole` from us: the job recorded in it, or — when a shared lock is free, so only
        shared holders are there — the tasks of an inference job array."""
        if not whole.try_lock(shared=True):
            return describe(whole.read())
        whole.unlock()
        tasks = []
        for p in self.run_dir.glob(task_lock_file("*", "*")):
            try:  # opened and closed here: this process holds no lock on these files to drop
                rec = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(rec, dict):
                tasks.append(rec)
        newest = max(tasks, key=lambda r: r.get("since", 0), default=None)
        return "the tasks of an inference job array" + (f" (the latest: {describe(newest)})" if newest else "")

    def release(self) -> None:
        while self._files:
            self._files.pop().close()


_held: list[RunDirLock] = []


def hold_run_dir(run_dir: str, comm, kind: str, task: int = 0, tasks: int = 1, error: type = HpcllmError) -> list[str]:
    """Rank 0 takes the run_dir's lock, held until release_run_dirs() or the process ends (on an
    error too: the kernel drops it); every rank learns the outcome (one broadcast, the job's first
    agreement), and a refused job raises the same error on every rank — none is left waiting for a
    rank that has gone. Returns the lines to log once logging is set up."""
    outcome = None
    if comm.rank == 0:
        lock = RunDirLock(run_dir, kind, task, tasks, error)
        try:
            outcome = ("held", lock.acquire())
        except HpcllmError as e:
            outcome = (type(e), str(e))
        except Exception as e:  # whatever it is, the other ranks must hear of it rather than wait
            outcome = (HpcllmError, f"run_dir {run_dir}: cannot take its lock ({type(e).__name__}: {e})")
        else:
            if not _held:
                atexit.register(release_run_dirs)
            _held.append(lock)
    what, detail = comm.broadcast_object(outcome)
    if what != "held":
        raise what(detail)
    return detail


def release_run_dirs() -> None:
    """Release what hold_run_dir took in this process (a clean end: the records are emptied)."""
    while _held:
        _held.pop().release()
