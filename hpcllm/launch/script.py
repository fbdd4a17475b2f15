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
import shlex

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
    if s.spare_nodes and not in_job_restarts(spec):
        raise ConfigError(f"slurm.spare_nodes={s.spare_nodes}: a {spec.kind} job does not restart in the job and "
                          "uses no spares; set slurm.spare_nodes=0")
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
# In-job restarts (training, slurm.max_restarts > 0: the lines of `restart_lines` define
# hpcllm_recover): hpcllm.launch.recover picks the step's nodes, and after a failed step reads its
# cause from srun's stderr, the nodes' states and the watchdog's reports; when it names a bad node
# (and the limit allows) the step runs again without it, as a new step of the same job, with
# HPCLLM_INJOB_RESTART telling the ranks which restart they are. Its answer is read with mapfile,
# one value a line: nothing it prints is evaluated.
# Both batch scripts define it before their step: the rendered templates and submitit's (as setup lines).
SRUN_PASSING_SIGNALS = [
    "srun() {  # hpcllm: the step in the background, so that signals to this shell reach it",
    "  local attempt step status log err tee launched next opts=() lines=()",
    '  if [ -n "${hpcllm_recover+x}" ]; then  # in-job restarts: the step\'s nodes (spares left out)',
    '    next=$("${hpcllm_recover[@]}" plan) || return 1',
    '    mapfile -t lines <<< "$next"; opts=("${lines[@]:1}")',
    "  fi",
    "  while :; do",
    "    for attempt in 1 2; do",
    '      log=$(mktemp "${TMPDIR:-/tmp}/hpcllm-srun.XXXXXX")',
    '      exec {err}> >(tee "$log" >&2); tee=$!  # srun stderr: on to the job log, and into $log',
    "      launched=$(date +%s.%N)",
    '      command srun "${opts[@]}" "$@" 2>&$err &',
    "      step=$!",
    '      exec {err}>&-',
    *[f'      trap "kill -{sig} $step 2>/dev/null" {sig}' for sig in ("USR1", "USR2", "TERM")],
    '      wait "$step"; status=$?',
    '      while kill -0 "$step" 2>/dev/null; do wait "$step"; status=$?; done  # a trap woke `wait`: wait on',
    "      trap - USR1 USR2 TERM",
    '      wait "$tee"  # until tee has written the last of it',
    '      if [ "$attempt" = 1 ] && grep -q "^srun: error: .*launch failed" "$log"; then',
    '        echo "hpcllm: srun did not start the job step; starting it once more, as a new step" >&2',
    '        rm -f "$log"; continue',
    "      fi",
    "      break",
    "    done",
    '    if [ "$status" != 0 ] && [ -n "${hpcllm_recover+x}" ] && next=$("${hpcllm_recover[@]}" next --status "$status" \\',
    '        --log "$log" --launched "$launched" --ended "$(date +%s.%N)" -- "${opts[@]}"); then',
    '      mapfile -t lines <<< "$next"; opts=("${lines[@]:1}")',
    '      export HPCLLM_INJOB_RESTART="${lines[0]}"',
    '      rm -f "$log"; continue',
    "    fi",
    '    rm -f "$log"',
    '    return "$status"',
    "  done",
    "}",
]


def in_job_restarts(spec: JobSpec) -> int:
    """slurm.max_restarts for a kind that restarts in the job (training, inference), else 0."""
    from hpcllm.jobs.kind import get_kind

    return spec.slurm.max_restarts if get_kind(spec.kind).restarts_in_job else 0


def restart_lines(spec: JobSpec, python: str, spec_file: str) -> list[str]:
    """The batch script's lines (before its step) that turn in-job restarts on: none when they are off."""
    if not in_job_restarts(spec):
        return []
    from hpcllm.launch.recover import FAULT_FILE

    faults = f"{spec.run_dir}/logs/{FAULT_FILE}"
    return [f"# in-job restarts (slurm.max_restarts={spec.slurm.max_restarts}, slurm.spare_nodes="
            f"{spec.slurm.spare_nodes}): see hpcllm.launch.recover",
            f"hpcllm_recover=({shlex.quote(python)} -m hpcllm.launch.recover {shlex.quote(str(spec_file))})",
            f"export HPCLLM_FAULT_FILE={shlex.quote(faults)}  # the watchdog names hung ranks there"]
