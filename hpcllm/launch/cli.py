"""Slurm commands: submit (submitit), render (sbatch scripts from job specs), jobs, logs, debug.

Options may come anywhere among the specs and overrides (`hpcllm submit a.yaml b.yaml --chain
train.max_steps=10`): these commands parse their arguments intermixed."""

from __future__ import annotations

import argparse


class _Intermixed(argparse.ArgumentParser):
    """A subcommand parser that lets options and positional words mix in any order. argparse's
    plain parsing gives every positional its words in one go, so words after an option would be
    refused as 'unrecognized arguments'."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inner:  # parse_known_intermixed_args calls back here for its two passes
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def intermixed_parser(sub, name: str, **kw) -> argparse.ArgumentParser:
    p = sub.add_parser(name, **kw)
    p.__class__ = _Intermixed  # same parser, intermixed parsing (add_parser has no per-parser class)
    return p


def register(sub, bench) -> None:
    from hpcllm.cli import add_spec_args

    p = intermixed_parser(sub, "render", help="write a plain sbatch script for a job spec (slurm/templates)")
    add_spec_args(p)
    p.add_argument("-o", "--output", help="script file to write (default: print it)")
    p.set_defaults(func=_render)

    p = intermixed_parser(sub, "submit", help="submit job specs to Slurm through submitit (--dry-run prints the sbatch scripts)")
    p.add_argument("specs", nargs="+", metavar="SPEC|key=value", help="job specs, and overrides for all of them")
    p.add_argument("--dry-run", action="store_true", help="check everything and print what would be submitted; submit nothing")
    p.add_argument("--chain", action="store_true", help="each job starts after the previous one succeeded (afterok)")
    p.set_defaults(func=_submit)

    p = intermixed_parser(sub, "jobs", help="submitted jobs and their Slurm state (sacct, squeue)")
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR|JOB",
                   help="run dirs (default: runs/*); job ids (123, an array task 120_3 or its own id) pick jobs")
    p.add_argument("--watch", type=float, default=0.0, help="refresh every N seconds (at least 10)")
    p.set_defaults(func=_jobs)
    p = intermixed_parser(sub, "logs", help="a rank's stdout (or --err) of a submitted job")
    p.add_argument("job", help="job id (an array task: ARRAY_TASK, e.g. 120_3, or its own job id)")
    p.add_argument("run_dirs", nargs="*", help="run dirs to look in (default: runs/*)")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--err", action="store_true", help="stderr instead of stdout")
    p.set_defaults(func=_logs)

    p = intermixed_parser(sub, "debug", help="print (--run: run) the salloc/srun commands that reproduce a job interactively")
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
    from hpcllm.errors import ConfigError
    from hpcllm.launch.render import render

    spec = load_spec(args.spec, args.overrides)
    text, spec_file = render(spec, args.spec)
    if args.output:
        try:
            write_text(args.output, text, mode=0o755)
        except OSError as e:
            raise ConfigError(f"-o {args.output}: cannot write the script: {e.strerror or e}") from None
        print(f"wrote {args.output} (runs {spec_file}); submit with: sbatch {args.output}")
    else:
        print(text, end="")
    return 0
