"""Slurm commands: render (sbatch scripts from job specs)."""

from __future__ import annotations


def register(sub, bench) -> None:
    from hpcllm.cli import add_spec_args

    p = sub.add_parser("render", help="write a plain sbatch script for a job spec (slurm/templates)")
    add_spec_args(p)
    p.add_argument("-o", "--output", help="script file to write (default: print it)")
    p.set_defaults(func=_render)


def _render(args) -> int:
    import os

    from hpcllm.config import load_spec
    from hpcllm.launch.render import render

    spec = load_spec(args.spec, args.overrides)
    text, spec_file = render(spec, args.spec)
    if args.output:
        tmp = args.output + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, args.output)
        print(f"wrote {args.output} (runs {spec_file}); submit with: sbatch {args.output}")
    else:
        print(text, end="")
    return 0
