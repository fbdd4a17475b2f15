"""Logging: one format on every rank, level from HPCLLM_LOG_LEVEL, per-rank files in the run dir.

Rank 0 logs INFO to stderr; other ranks only WARNING and above (so N ranks don't print N copies),
unless HPCLLM_LOG_LEVEL=debug, which turns on everything on every rank, collective tracing included.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

FORMAT = "%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"


def env_level() -> int | None:
    name = os.environ.get("HPCLLM_LOG_LEVEL", "").strip().upper()
    if not name:
        return None
    level = logging.getLevelName(name)
    return level if isinstance(level, int) else None


class RankLogFile(logging.FileHandler):
    """A rank's log file, appended to only if it is a regular file, never through a link
    (hpcllm.paths.open_append: a link planted in the run dir cannot make every rank write into another
    file). When it cannot be written (a full disk, a quota) it says so once on the console and takes no
    more lines — rather than logging's traceback at every line after."""

    failed = False

    def _open(self):
        from hpcllm.paths import open_append

        return open_append(self.baseFilename)

    def emit(self, record):
        if not self.failed:
            super().emit(record)

    def flush(self):
        if not self.failed:
            try:
                super().flush()
            except OSError:
                self.handleError(None)

    def close(self):
        try:
            super().close()
        except OSError:  # what was still buffered cannot be written either; said once already, or now
            self.handleError(None)

    def handleError(self, record):
        if self.failed:
            return
        self.failed = True
        err = sys.exc_info()[1]
        print(f"hpcllm: warning: {self.baseFilename} cannot be written ({getattr(err, 'strerror', None) or err}): "
              "this rank's log goes on only on the console", file=sys.stderr, flush=True)


def setup_logging(rank: int = 0, run_dir: str | os.PathLike | None = None) -> None:
    root = logging.getLogger("hpcllm")
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    forced = env_level()
    fmt = logging.Formatter(FORMAT.format(rank=rank), datefmt="%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.setLevel(forced if forced is not None else (logging.INFO if rank == 0 else logging.WARNING))
    root.addHandler(console)
    if run_dir is not None:
        logs = Path(run_dir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        fh = RankLogFile(logs / f"rank{rank}.log")
        fh.setFormatter(fmt)
        fh.setLevel(forced if forced is not None else logging.INFO)
        root.addHandler(fh)
    root.setLevel(forced if forced is not None else logging.INFO)
    root.propagate = False


def to_rank_log(message: str, exc_info=None) -> None:
    """Write a fatal error into this rank's log file (not the console, which has it already), flushed."""
    root = logging.getLogger("hpcllm")
    for h in root.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(root.makeRecord("hpcllm", logging.ERROR, __file__, 0, message, None, exc_info))
            h.flush()
