"""Stop requests: SIGUSR2 (submitit's and sbatch --signal's default), SIGUSR1 and SIGTERM set a flag,
and so does getting within `margin` seconds of SLURM_JOB_END_TIME. The trainer checks the flag at
each step boundary; all ranks agree through one allreduce, checkpoint, and exit with EXIT_REQUEUE.
"""

from __future__ import annotations

import logging
import os
import signal
import time

log = logging.getLogger("hpcllm.train")

SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
TIME_LIMIT = 1000  # StopRequest.code() of the time-limit margin: above every signal number


_early: list[int] = []  # the signal numbers caught before the trainer's handler


def catch_early_signals() -> None:
    """Remember a stop signal that comes before the trainer installs its own handler — Slurm may send
    the time-limit warning at the very start of a short job — instead of dying of it (or letting
    submitit's handler end the job). The trainer's StopRequest picks it up."""

    def remember(signum, frame) -> None:
        _early.append(int(signum))

    for sig in SIGNALS:
        signal.signal(sig, remember)


class StopRequest:
    """Why this rank was asked to stop, as a code the ranks can agree on (`code()`: 0 for not asked,
    a signal's number, or TIME_LIMIT), and its words (`reason`, `describe`)."""

    def __init__(self, margin_s: float = 120.0, end_time: float | None = None):
        self._code = 0
        env_end = os.environ.get("SLURM_JOB_END_TIME")
        self.end_time = end_time if end_time is not None else (float(env_end) if env_end else None)
        self.margin_s = margin_s
        if self.end_time is not None:
            # a margin longer than the time left would stop every restart before its first step: keep
            # at least half of the run for training
            left = self.end_time - time.time()
            if margin_s > left / 2:
                self.margin_s = max(left / 2, 0.0)
                log.warning("train.end_time_margin_s=%g s but only %.0f s left before the Slurm time limit: "
                            "stopping %.0f s before it instead", margin_s, left, self.margin_s)
        self._previous = {}

    def install(self) -> "StopRequest":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        if _early and not self._code:
            self._code = _early[0]
        _early.clear()
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self._code = int(signum)

    def requested(self) -> bool:
        if not self._code and self.end_time is not None and time.time() > self.end_time - self.margin_s:
            self._code = TIME_LIMIT
        return self._code != 0

    def code(self) -> int:
        """This rank's reason as a number the ranks can agree on (0: none; a signal's number; or
        TIME_LIMIT), so that every rank names the same reason whichever saw it first."""
        self.requested()
        return self._code

    @property
    def reason(self) -> str | None:
        return self.describe(self._code) if self._code else None  # (what requested() last found)

    def describe(self, code: int) -> str:
        """The reason `code` (the ranks' agreed maximum) stands for."""
        if code == TIME_LIMIT:
            return f"within {self.margin_s:g} s of the Slurm time limit"
        try:
            return f"signal {signal.Signals(code).name}"
        except ValueError:
            return "another rank was asked to stop"
