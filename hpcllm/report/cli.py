"""`hpcllm report RUN_DIR [--json] [--plot PNG]`: a run's starts, restarts and goodput."""

from __future__ import annotations


def register(sub, bench) -> None:
    p = sub.add_parser("report", help="a run over all its starts: endings, restarts, recovery time, goodput")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--plot", metavar="PNG", help="also write a timeline of the starts (loss on top)")
    p.add_argument("--no-sacct", action="store_true", help="do not ask Slurm's accounting for the jobs' allocations")
    p.set_defaults(func=_report)


def _report(args) -> int:
    import json

    from hpcllm.report.report import build_report, format_report

    rep = build_report(args.run_dir, use_sacct=not args.no_sacct)
    print(json.dumps(rep, indent=2) if args.json else format_report(rep))
    if args.plot:
        from hpcllm.report.timeline import plot_timeline

        print(f"wrote {plot_timeline(rep, args.plot)}", flush=True)
    return 0
