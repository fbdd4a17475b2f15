"""`hpcllm render SPEC [-o job.sbatch]`: a plain sbatch script from a job spec, for people who
`sbatch` by hand. Templates live in slurm/templates/ (Jinja2). Values that go into `#SBATCH` lines
are validated (sbatch reads those lines itself: a newline there would start a new line of script);
everything that reaches the shell is quoted with shlex.quote.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from hpcllm.config import JobSpec, dump_spec
from hpcllm.atomic import write_text
from hpcllm.errors import ConfigError
from hpcllm.jobs import get_kind

TEMPLATES = Path(__file__).resolve().parents[2] / "slurm" / "templates"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


def _env():
    import jinja2

    if not TEMPLATES.is_dir():
        raise ConfigError(f"sbatch templates not found at {TEMPLATES} (install hpcllm from its checkout: pip install -e .)")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, autoescape=False)
    env.filters["q"] = lambda v: shlex.quote(str(v))
    return env


def sbatch_path(value: str, what: str) -> str:
    """A path for an #SBATCH line: no whitespace, quotes or control characters (sbatch would split it)."""
    if any(c.isspace() or c in "\"'\\`$;" or ord(c) < 32 for c in value):
        raise ConfigError(f"{what} {value!r} cannot go into an #SBATCH line (spaces, quotes, $, ; or control "
                          "characters): choose a plainer path")
    return value


def job_name(spec: JobSpec) -> str:
    if any(ord(c) < 32 for c in spec.name):
        raise ConfigError(f"name {spec.name!r} contains control characters (a newline would inject script lines)")
    return _SAFE_NAME.sub("_", spec.name)[:100] or "hpcllm"


def render(spec: JobSpec, spec_source: str = "<spec>", python: str | None = None) -> tuple[str, Path]:
    """Return (script text, path of the resolved spec the script runs) and write that spec."""
    run_dir = Path(spec.run_dir)
    log_dir = sbatch_path(str(run_dir / "logs"), "run_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    spec_file = run_dir / f"{spec.kind}-spec.yaml"
    write_text(spec_file, dump_spec(spec))
    text = _env().get_template(get_kind(spec.kind).template).render(
        s=spec.slurm, job_name=job_name(spec), log_dir=log_dir, spec_file=str(spec_file),
        spec_source=str(spec_source).replace("\n", " "), python=spec.slurm.python or python or sys.executable,
        srun_args=" ".join(shlex.quote(a) for a in spec.slurm.srun_args),
    )
    return text, spec_file
