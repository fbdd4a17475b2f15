"""Stall watchdog: a collective that has not completed within `dist.timeout_s` ends the job.

The communicator marks each blocking point (`enter`/`leave`); a daemon thread checks how long the
current one has lasted. When it passes the timeout, the thread finds out who is missing by a small
point-to-point exchange on a private MPI communicator: every rank that is itself stuck sends its
collective count to all others and listens for theirs for a short grace period. Ranks that do not
answer (dead, hung, or busy outside communication) or answer with a lower count did not arrive. The
message names them, then the job is aborted (MPI_Abort under MPI, so mpirun/srun tear down every
rank) with exit code 4. Without MPI (torchrun) the message cannot name ranks but the exit still happens.

Time this process did not run — stopped with SIGSTOP, or the whole job suspended by Slurm — is not
waiting: the thread notices the gap between its polls and leaves it out, so a job that is suspended
and resumed carries on, and a rank that was stopped never blames the others for its own absence.
Waits that are not collectives (the data loader) are marked with `local=True`: they are timed the
same way, but not counted in the collective sequence the ranks compare.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, Callable

from hpcllm.errors import CollectiveTimeout, HpcllmError

log = logging.getLogger("hpcllm.comm")

TIMEOUT_EXIT_CODE = CollectiveTimeout.exit_code
_TAG = 7177


class Watchdog:
    def __init__(
        self,
        rank: int,
        size: int,
        timeout_s: float,
        mpi_comm: Any = None,
        abort: Callable[[int], None] | None = None,
    ):
        self.rank, self.size, self.timeout_s = rank, size, timeout_s
        # Dup is collective: every rank constructs its watchdog at the same point of init.
        self._comm = mpi_comm.Dup() if mpi_comm is not None else None
        self._abort = abort or (lambda code: os._exit(code))
        self._seq = 0
        # (seq, what, size, start time, frozen total at start, local wait?)
        self._active: tuple[int, str, Any, float, float, bool] | None = None
        self._frozen = 0.0  # seconds this process was not running (summed over the gaps seen)
        self._stop = threading.Event()
        self._poll_s = min(1.0, max(0.05, timeout_s / 20))
        # a gap between two polls longer than this means the process was stopped, not just busy
        self._freeze_s = max(2.0, 5 * self._poll_s)
        self._thread = threading.Thread(target=self._run, name="hpcllm-watchdog", daemon=True)
        self._thread.start()

    def enter(self, what: str, tensor: Any = None, local: bool = False) -> None:
        if not local:
            self._seq += 1
        # keep the tensor's size, never the tensor: a reference held here could make this daemon
        # thread free the last copy of it, and a torch tensor freed while the interpreter exits
        # aborts the process ("terminate called without an active exception")
        size = None if tensor is None else (tensor.numel() * tensor.element_size(), tensor.dtype)
        self._active = (self._seq, what, size, time.monotonic(), self._frozen, local)

    def leave(self) -> None:
        self._active = None

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    # ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self._poll_s):
            now = time.monotonic()
            gap = now - last - self._poll_s
            last = now
            if gap > self._freeze_s:
                self._frozen += gap
                log.warning("rank %d did not run for %.0f s (stopped or suspended?): not counted as waiting",
                            self.rank, gap)
            active = self._active
            if active is not None and now - active[3] - (self._frozen - active[4]) > self.timeout_s:
                self._fire(*active)
                return

    def _fire(self, seq: int, what: str, size: tuple[int, Any] | None, t0: float, frozen0: float,
              local: bool) -> None:
        stopped = self._frozen - frozen0
        waited = time.monotonic() - t0 - stopped
        desc = what
        if size is not None:
            desc += f" of {size[0] / 2**20:.2f} MB {str(size[1])[6:]}"
        waited_s = f"waited {waited:.1f} s" + (f", not counting {stopped:.0f} s stopped" if stopped else "")
        if local:  # stuck on its own, not in a collective: nobody else to ask
            msg = (f"[hpcllm rank {self.rank}] stuck in {desc} (not a collective) for longer than "
                   f"dist.timeout_s={self.timeout_s:g} s ({waited_s}): this rank is the one that is stuck. "
                   "Aborting the job.")
            print(msg, file=sys.stderr, flush=True)
            log.error(msg)
            _report(stuck=[self.rank], rank=self.rank)
            self._abort(TIMEOUT_EXIT_CODE)
            return
        msg = (
            f"[hpcllm rank {self.rank}] collective #{seq} ({desc}) did not complete within "
            f"dist.timeout_s={self.timeout_s:g} s ({waited_s})"
        )
        try:
            missing, behind = self._who_is_missing(seq)
        except Exception as e:  # diagnosis is best effort; the abort below is not
            missing, behind = None, {}
            msg += f"; could not ask the other ranks ({e})"
        if missing is not None:
            if missing or behind:
                parts = []
                if missing:
                    parts.append(f"no answer from rank(s) {_ranks(missing)} (dead, hung, or busy outside communication)")
                if behind:
                    parts.append(
                        "still before this collective: "
                        + ", ".join(f"rank {r} (at #{s})" for r, s in sorted(behind.items()))
                    )
                msg += "; ranks that did not arrive: " + "; ".join(parts)
            else:
                msg += "; every rank answered and reached it: the communication layer itself is stuck"
        msg += ". Aborting the job."
        print(msg, file=sys.stderr, flush=True)
        log.error(msg)
        _report(missing=missing or [], behind=behind, rank=self.rank, collective=seq)
        self._abort(TIMEOUT_EXIT_CODE)

    def _who_is_missing(self, seq: int) -> tuple[list[int] | None, dict[int, int]]:
        if self._comm is None or self.size == 1:
            return None, {}
        import numpy as np

        others = [r for r in range(self.size) if r != self.rank]
        mine = np.array([seq], dtype=np.int64)
        bufs = {r: np.zeros(1, dtype=np.int64) for r in others}
        recvs = {r: self._comm.Irecv(bufs[r], source=r, tag=_TAG) for r in others}
        sends = [self._comm.Isend(mine, dest=r, tag=_TAG) for r in others]
        # the other stuck ranks time out a little before or after us: give them a grace period
        deadline = time.monotonic() + min(30.0, max(2.0, self.timeout_s / 5))
        answered: dict[int, int] = {}
        while time.monotonic() < deadline and len(answered) < len(others):
            for r, req in recvs.items():
                if r not in answered and req.Test():
                    answered[r] = int(bufs[r][0])
            time.sleep(0.01)
        del sends  # never waited on: we abort next, and a dead peer would block us
        missing = [r for r in others if r not in answered]
        behind = {r: s for r, s in answered.items() if s < seq}
        return missing, behind


def _report(**fields) -> None:
    """One JSON line for the batch script's in-job restart (hpcllm.launch.recover) in $HPCLLM_FAULT_FILE,
    when the job set one: which ranks did not arrive, so that their node is left out of the restart.
    Best effort, like the naming itself: the abort that follows must happen whatever this does."""
    path = os.environ.get("HPCLLM_FAULT_FILE")
    if not path:
        return
    import json

    rec = dict(time=time.time(), job=os.environ.get("SLURM_JOB_ID"), step=os.environ.get("SLURM_STEP_ID"),
               node=os.environ.get("SLURMD_NODENAME"), **fields)
    from hpcllm.paths import open_append  # never through a link planted in the run dir's logs/

    try:
        with open_append(path) as f:
            f.write(json.dumps({k: (sorted(v.items()) if isinstance(v, dict) else v) for k, v in rec.items()}) + "\n")
    except (OSError, HpcllmError) as e:
        print(f"[hpcllm rank {fields.get('rank')}] could not write the watchdog's report to {path} ({e})",
              file=sys.stderr, flush=True)


def _ranks(rs: list[int]) -> str:
    return ", ".join(str(r) for r in rs)
