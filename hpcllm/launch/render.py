"""`hpcllm render SPEC [-o job.sbatch]`: a plain sbatch script from a job spec, for people who
`sbatch` by hand. Templates live in slurm/templates/ (Jinja2): base.sbatch.j2 holds what every job
does — resources, site setup, the step under srun with signals passed on to it (SRUN_PASSING_SIGNALS,
shared with `hpcllm submit`), and the last word
of hpcllm.launch.finish — and each kind's template adds its own lines. Every value is checked by
hpcllm.launch.script.check_script_values first (sbatch reads `#SBATCH` lines itself: a newline
there would start a new line of script); everything that reaches the shell is quoted.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from hpcllm.atomic import write_text
from hpcllm.config import JobSpec, dump_spec
from hpcllm.errors import ConfigError
from hpcllm.jobs.kind import get_kind
from hpcllm.launch.script import SRUN_PASSING_SIGNALS, check_script_values, job_name, restart_lines

TEMPLATES = Path(__file__).resolve().parents[2] / "slurm" / "templates"


def _env():
    import jinja2

    if not TEMPLATES.is_dir():
        raise ConfigError(f"sbatch templates not found at {TEMPLATES} (install hpcllm from its checkout: pip install -e .)")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, autoescape=False)
    env.filters["q"] = lambda v: shlex.quote(str(v))
    return env


def render(spec: JobSpec, spec_source: str = "<spec>", python: str | None = None) -> tuple[str, Path]:
    """Return (script text, path of the resolved spec the script runs) and write that spec."""
    check_script_values(spec, spec_source)
    kind = get_kind(spec.kind)
    run_dir = Path(spec.run_dir)
    log_dir = run_dir / "logs"
    spec_file = run_dir / f"{spec.kind}-spec.yaml"
    python = spec.slurm.python or python or sys.executable
    text = _env().get_template(kind.template).render(
        s=spec.slurm, kind=kind.name, job_name=job_name(spec), log_dir=str(log_dir), spec_file=str(spec_file),
        spec_source=str(spec_source), python=python, restart_lines=restart_lines(spec, python, str(spec_file)),
        srun_args=" ".join(shlex.quote(a) for a in spec.slurm.srun_args), srun_passing_signals=SRUN_PASSING_SIGNALS,
    )
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        write_text(spec_file, dump_spec(spec))
    except OSError as e:
        raise ConfigError(f"{spec_source}: cannot write the resolved spec {spec_file} (run_dir): "
                          f"{e.strerror or e}") from None
    return text, spec_file
