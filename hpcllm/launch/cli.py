"""Slurm commands: render (sbatch scripts from job specs), submit (submitit)."""

from __future__ import annotations


def register(sub, bench) -> None:
    from hpcllm.cli import add_spec_args

    p = sub.add_parser("render", help="write a plain sbatch script for a job spec (slurm/templates)")
    add_spec_args(p)
    p.add_argument("-o", "--output", help="script file to write (default: print it)")
    p.set_defaults(func=_render)

    p = sub.add_parser("submit", help="submit job specs to Slurm through submitit (--dry-run prints the sbatch script)")
    p.add_argument("specs", nargs="+", metavar="SPEC|key=value", help="job specs, then overrides for all of them")
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted; submit nothing")
    p.add_argument("--chain", action="store_true", help="each job starts after the previous one succeeded (afterok)")
    p.set_defaults(func=_submit)

    p = sub.add_parser("debug", help="print (--run: run) the salloc/srun commands that reproduce a job interactively")
    add_spec_args(p)
    p.add_argument("--run", action="store_true", help="allocate and run the job under srun now")
    p.set_defaults(func=_debug)


def _debug(args) -> int:
    from hpcllm.config import load_spec
    from hpcllm.launch.debug import commands, run

    spec = load_spec(args.spec, args.overrides)
    if args.run:
        return run(spec, args.spec)
    print("\n".join(commands(spec, args.spec)))
    return 0


def _submit(args) -> int:
    from hpcllm.launch.submit import main

    return main(args)


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
