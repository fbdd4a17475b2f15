"""`hpcllm` commands that need one process each, run many to one Python process (CliSession).

    session = CliSession()
    p = session.run("infer", spec, "infer.seed=5")   # a CompletedProcess, as subprocess.run gives
    session.close()
"""

from __future__ import annotations

import json
import select
import subprocess
import sys

CLI = [sys.executable, "-m", "hpcllm.cli"]

# The child of CliSession: `hpcllm.cli.main(argv)` for each JSON argv read from stdin, its exit code,
# stdout and stderr (captured at the file descriptors, so logging's and C's output too) written back
# as one JSON line. What a process exit would do between two commands is done here: the run-dir
# locks released (the CLI's atexit hook), the log files closed and logging as a new process has it,
# leaked file objects collected.
_SESSION = r"""
import gc, json, logging, os, sys, tempfile, traceback
reply = os.fdopen(os.dup(1), "w")
import hpcllm.cli
from hpcllm.jobs.lock import release_run_dirs

def fresh_logging():
    root = logging.getLogger("hpcllm")
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(logging.NOTSET)
    root.propagate = True

for line in sys.stdin:
    argv = json.loads(line)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            rc = hpcllm.cli.main(argv)
        except SystemExit as e:  # argparse's usage errors, --help
            rc = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        except BaseException:  # what an uncaught exception would print before the process ends
            traceback.print_exc()
            rc = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            release_run_dirs()
            fresh_logging()
            gc.collect()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        out.seek(0)
        err.seek(0)
        texts = [f.read().decode("utf-8", errors="replace") for f in (out, err)]
    reply.write(json.dumps([rc, *texts]) + "\n")
    reply.flush()
"""


class CliSession:
    """Many one-process `hpcllm` commands in ONE Python process: `session.run(*args)` is `run_cli(*args)`
    less the ~3 s of interpreter start and imports that each command would pay again. For a test
    whose subject is what the commands do (a refusal, a resume, an error naming a file), not how a
    process starts or ends; such a test still runs at least one of its commands through `run_cli`,
    the real command line. A command that runs past `timeout` kills the session (the next call
    starts a new one) and raises subprocess.TimeoutExpired, as `run_cli` does."""

    def __init__(self):
        self.proc = None

    def run(self, *args, timeout: float = 120) -> subprocess.CompletedProcess:
        argv = list(map(str, args))
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, "-c", _SESSION], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)
        self.proc.stdin.write(json.dumps(argv) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            dead = self.proc.poll()
            self.close()
            if dead is None:
                raise subprocess.TimeoutExpired([*CLI, *argv], timeout)
            raise AssertionError(f"the CLI session died (exit {dead}) running: hpcllm {' '.join(argv)}")
        rc, out, err = json.loads(line)
        return subprocess.CompletedProcess([*CLI, *argv], rc, out, err)

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc.stdin.close()
            self.proc.stdout.close()
            self.proc = None
