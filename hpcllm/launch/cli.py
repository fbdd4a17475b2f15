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

    p = sub.add_parser("jobs", help="submitted jobs and their Slurm state (sacct)")
    p.add_argument("run_dirs", nargs="*", help="run dirs (default: runs/*)")
    p.add_argument("--watch", type=float, default=0.0, help="refresh every N seconds (at least 10)")
    p.set_defaults(func=_jobs)
    p = sub.add_parser("logs", help="a rank's stdout (or --err) of a submitted job")
    p.add_argument("job", help="job id (array task: ID_i)")
    p.add_argument("run_dirs", nargs="*", help="run dirs to look in (default: runs/*)")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--err", action="store_true", help="stderr instead of stdout")
    p.set_defaults(func=_logs)

    p = sub.add_parser("debug", help="print (--run: run) the salloc/srun commands that reproduce a job interactively")
    add_spec_args(p)
    p.add_argument("--run", action="store_true", help="allocate and run the job under srun now")
    p.set_defaults(func=_debug)


def _jobs(args) -> int:
    from hpcllm.launch.jobs import list_jobs

    return list_jobs(args.run_dirs, args.watch)


def _logs(args) -> int:
    from hpcllm.launch.jobs import show_logs

    return show_logs(args.job, args.rank, args.err, args.run_dirs)


def _debug(args) -> int:
    from hpcllm.config import load_spec
    from hpcllm.launch.debug import commands, run

    spec = load_spec(args.spec, args.overrides)
    if args.run:
        return run(spec, args.spec, args.overrides)
    print("\n".join(commands(spec, args.spec, args.overrides)))
    return 0


def _submit(args) -> int:
    from hpcllm.launch.submit import main

    return main(args)


def _render(args) -> int:
    from hpcllm.atomic import write_text
    from hpcllm.config import load_spec
    from hpcllm.launch.render import render

    spec = load_spec(args.spec, args.overrides)
    text, spec_file = render(spec, args.spec)
    if args.output:
        write_text(args.output, text, mode=0o755)
        print(f"wrote {args.output} (runs {spec_file}); submit with: sbatch {args.output}")
    else:
        print(text, end="")
    return 0
