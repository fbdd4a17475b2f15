"""The one check of every job-spec value that reaches a batch script or a printed shell command.

`hpcllm submit` (submitit's script), `hpcllm render` (slurm/templates) and `hpcllm debug` (salloc /
srun lines) all call `check_script_values` before they write anything. Values on a shell line are
quoted where they are written; what this adds is that no value can leave its line: sbatch reads
`#SBATCH` lines itself, without shell quoting, and a newline in a name, a path, a setup line or an
extra option would start a new line of script.

    check_script_values(spec, spec_path, overrides)   # raises ConfigError naming the key
    name = job_name(spec)                              # the spec's name as Slurm's job name

Both batch scripts also share SRUN_PASSING_SIGNALS, the lines that make the step's `srun` pass on
signals sent to the batch shell.
"""

from __future__ import annotations

import re

from hpcllm.config import JobSpec
from hpcllm.errors import ConfigError

# partition / account / qos / constraint: what Slurm accepts there (constraint: features and operators)
_WORD = re.compile(r"^[A-Za-z0-9_.,:&|\-\[\]*]*$")
# a path on an #SBATCH line: sbatch splits at whitespace, strips quotes and expands %j, %x, ...
_SBATCH_PATH_BAD = set("\"'\\`$;%")
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def _control(value: str) -> bool:
    """A line break or another control character (a tab is fine inside a line)."""
    return any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in value)


def one_line(key: str, value: str) -> str:
    if _control(value):
        raise ConfigError(f"{key} {value!r} contains a line break or control character: it would end its line of "
                          "the batch script and start another")
    return value


def sbatch_path(key: str, value: str) -> str:
    """A path that goes onto an #SBATCH line (log files under run_dir)."""
    one_line(key, value)
    if any(c.isspace() or c in _SBATCH_PATH_BAD for c in value):
        raise ConfigError(f"{key} {value!r} cannot go onto an #SBATCH line (whitespace, quotes, $, ;, % or a "
                          "backslash): choose a plainer path")
    return value


def check_script_values(spec: JobSpec, spec_path: str | None = None, overrides: list[str] | tuple = ()) -> None:
    """Every value of the spec that a batch script or a printed command carries, checked in one place."""
    s = spec.slurm
    one_line("name", spec.name)
    sbatch_path("run_dir", spec.run_dir)
    one_line("slurm.python", s.python)
    for key in ("partition", "account", "qos", "constraint"):
        if not _WORD.match(getattr(s, key)):
            raise ConfigError(f"slurm.{key} {getattr(s, key)!r} has characters Slurm does not accept there")
    for i, opt in enumerate(s.extra):
        if not opt.startswith("--") or any(c.isspace() or c in "\"'\\`" for c in opt) or _control(opt):
            raise ConfigError(f"slurm.extra[{i}] {opt!r} is not a single --option[=value] (no spaces or quotes)")
    for i, line in enumerate(s.setup):
        one_line(f"slurm.setup[{i}]", line)
    for i, arg in enumerate(s.srun_args):
        one_line(f"slurm.srun_args[{i}]", arg)
    if spec_path is not None:
        one_line("job spec path", str(spec_path))
    for ov in overrides:
        one_line("override", ov)


def job_name(spec: JobSpec) -> str:
    """The spec's name as a Slurm job name: letters, digits and ._- (anything else becomes _)."""
    one_line("name", spec.name)
    return _NAME_UNSAFE.sub("_", spec.name)[:100] or "hpcllm"


# Lines of bash that define `srun` as a function running the real srun in the background and waiting
# for it. bash runs a trap only once its foreground command has ended, so with srun in the foreground
# a signal sent to the batch shell (`scancel --batch --signal=USR2`, a preemption's SIGTERM) kills the
# shell — the job ends FAILED 0:12 although its ranks checkpointed. Here the trap passes the signal on
# to srun, which hands it to every rank, and the function returns srun's status.
# A step that never launched is started once more: Slurm 22.05's mpi/pmix plugin leaves its socket
# (`stepd.slurm.pmix.<job>.<step>` in the slurmd spool) behind when a step's set-up fails or its
# slurmstepd dies, and a requeued job numbers its steps from 0 again, so its restart fails with
# "Address already in use" — and srun exits 0. A new attempt is a new step with new names. (The local
# test cluster also cleans those files in its Prolog/Epilog; a site's Epilog should too.)
# Both batch scripts define it before their step: the rendered templates and submitit's (as setup lines).
SRUN_PASSING_SIGNALS = [
    "srun() {  # hpcllm: the step in the background, so that signals to this shell reach it",
    "  local attempt step status log err tee",
    "  for attempt in 1 2; do",
    '    log=$(mktemp "${TMPDIR:-/tmp}/hpcllm-srun.XXXXXX")',
    '    exec {err}> >(tee "$log" >&2); tee=$!  # srun stderr: on to the job log, and into $log',
    '    command srun "$@" 2>&$err &',
    "    step=$!",
    '    exec {err}>&-',
    *[f'    trap "kill -{sig} $step 2>/dev/null" {sig}' for sig in ("USR1", "USR2", "TERM")],
    '    wait "$step"; status=$?',
    '    while kill -0 "$step" 2>/dev/null; do wait "$step"; status=$?; done  # a trap woke `wait`: wait on',
    "    trap - USR1 USR2 TERM",
    '    wait "$tee"  # until tee has written the last of it',
    '    if [ "$attempt" = 1 ] && grep -q "^srun: error: .*launch failed" "$log"; then',
    '      echo "hpcllm: srun did not start the job step; starting it once more, as a new step" >&2',
    '      rm -f "$log"; continue',
    "    fi",
    '    rm -f "$log"',
    '    return "$status"',
    "  done",
    "}",
]
