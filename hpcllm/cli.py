"""The `hpcllm` command. Each package registers its own subcommands; this file only wires them up
and turns user mistakes (`HpcllmError`) into one clear line and an exit code instead of a traceback.

    hpcllm config jobs/train_tiny.yaml train.max_steps=10     print the resolved job spec
    hpcllm prepare|train|infer SPEC [k=v ...]                  run a job (here, mpirun or srun)
    hpcllm bench allreduce|data|train|infer ...                benchmarks beside their peers
    hpcllm submit|render|debug|jobs|logs ...                   Slurm
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import importlib
import os
import sys

from hpcllm import __version__
from hpcllm.errors import HpcllmError

# packages that add subcommands: each has a `cli.register(subparsers, bench_subparsers)`
COMMAND_MODULES = [
    "hpcllm.comm.cli",
    "hpcllm.data.cli",
    "hpcllm.train.cli",
    "hpcllm.parallel.cli",
    "hpcllm.infer.cli",
    "hpcllm.checkpoint.cli",
    "hpcllm.launch.cli",
    "hpcllm.jobs.cli",
    "hpcllm.report.cli",
    "hpcllm.monitor.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpcllm", description="GPT training and offline inference on MPI/Slurm.")
    parser.add_argument("--version", action="version", version=f"hpcllm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench = sub.add_parser("bench", help="benchmarks, each printed beside its peer").add_subparsers(
        dest="bench", metavar="BENCH", required=True
    )
    p = sub.add_parser("config", help="print the resolved job spec (YAML) after overrides")
    add_spec_args(p)
    p.set_defaults(func=_config)
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # a package that has no commands yet
                continue
            raise
        mod.register(sub, bench)
    return parser


def add_spec_args(p: argparse.ArgumentParser) -> None:
    """SPEC [key=value ...] — the arguments every job command takes."""
    p.add_argument("spec", help="job spec (YAML)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override a spec value, e.g. train.max_steps=100")


def _config(args) -> int:
    from hpcllm.config import dump_spec, load_spec

    print(dump_spec(load_spec(args.spec, args.overrides)), end="")
    return 0


def _mpi_world():
    """MPI's world communicator when MPI is running with several ranks, else None."""
    if "mpi4py.MPI" not in sys.modules:
        return None
    from mpi4py import MPI

    if MPI.Is_initialized() and not MPI.Is_finalized() and MPI.COMM_WORLD.Get_size() > 1:
        return MPI.COMM_WORLD
    return None


def report_fatal(message: str) -> None:
    """A fatal error goes to stderr and to the rank's log file, flushed, before anything aborts:
    under mpirun an MPI_Abort right after a write can tear the job down before the launcher has
    forwarded the line, so the abort waits a moment for it (and the log keeps it regardless)."""
    from hpcllm.log import to_rank_log

    world = _mpi_world()
    if world is not None:
        message = message.replace(": error: ", f": error (rank {world.Get_rank()}): ", 1)
    print(message, file=sys.stderr, flush=True)
    to_rank_log(message)


def _abort_other_ranks(code: int) -> None:
    """Under MPI with several ranks, exiting one rank would leave the others waiting forever."""
    world = _mpi_world()
    if world is not None:
        import time

        time.sleep(1.0)  # let the launcher forward the error line (see report_fatal)
        world.Abort(code)


def _catch_job_signals_early(argv: list[str]) -> None:
    """A job's ranks may get Slurm's time-limit warning (USR2) while still starting — importing torch
    takes seconds, more on a busy node — and its default action kills them. So before anything
    heavy: a kind that requeues remembers a stop signal for its trainer to act on; the others keep
    working through it (they run to the time limit and are retried as a whole)."""
    import signal

    from hpcllm.jobs import kind_names
    from hpcllm.jobs.kind import get_kind

    if not argv or argv[0] not in kind_names():
        return
    if get_kind(argv[0]).requeue:
        from hpcllm.train.signals import catch_early_signals

        catch_early_signals()
    else:
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    _catch_job_signals_early(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HpcllmError as e:
        report_fatal(f"hpcllm {args.command}: error: {e}")
        _abort_other_ranks(e.exit_code)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"hpcllm {args.command}: interrupted", file=sys.stderr, flush=True)
        return 130
    except BrokenPipeError:  # `hpcllm config x.yaml | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def main_exit() -> None:
    """Console-script entry point."""
    # a crash in native code (MPI, a kernel) prints where Python was, on every rank, before MPI's or
    # the OS's own report: the rank's log then says more than "Segmentation fault"
    faulthandler.enable()
    code = main()
    # Skip the interpreter's last garbage collections: they walk every object torch made (~1 CPU-second
    # per rank at every exit, measured) only to free memory the process gives back anyway. atexit
    # handlers, logging's flush and the freeing of everything not in a reference cycle still run.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    main_exit()
