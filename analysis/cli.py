"""`corroprune report` and `corroprune dashboard`: registered by sweep.cli through add_report_commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainables.errors import UserError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_report_commands(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser(
        "report", help="tables and an offline HTML dashboard of a sweep, finished or still running"
    )
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    report.add_argument("--out", type=Path, help="output folder (default RUN_DIR/report)")
    report.add_argument(
        "--measure-latency",
        action="store_true",
        help="first time each distinct deployable architecture alone in this process (CPU, "
        "batch 1) into RUN_DIR/latency.json, which the report's latency then comes from",
    )
    report.add_argument(
        "--threads", type=int, help="torch threads for --measure-latency (default min(4, cores))"
    )
    report.add_argument(
        "--repeats", type=int, help="timed runs per architecture for --measure-latency (default 20)"
    )
    report.set_defaults(func=cmd_report)

    dash = sub.add_parser("dashboard", help="a live dashboard that refreshes while a sweep runs")
    dash.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    dash.add_argument("--host", default="127.0.0.1", help="bind address (default localhost only)")
    dash.add_argument("--port", type=int, default=8050)
    dash.add_argument("--refresh", type=float, default=10.0, help="seconds between re-reads")
    dash.set_defaults(func=cmd_dashboard)


def check_run_dir(run_dir: Path) -> Path:
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    if not (run_dir / "trials").is_dir() and not (run_dir / "sweep.yaml").is_file():
        raise UserError(f"{run_dir} is not a sweep run: it has neither sweep.yaml nor trials/")
    return run_dir


def measure_latency(run_dir: Path, threads: int | None, repeats: int | None) -> None:
    """`report --measure-latency`: RUN_DIR/latency.json, one line per architecture as it goes."""
    from analysis.latency import DEFAULT_REPEATS, measure_run_latency

    def echo(line: str) -> None:
        print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout, flush=True)

    repeats = DEFAULT_REPEATS if repeats is None else repeats
    measure_run_latency(run_dir, threads=threads, repeats=repeats, echo=echo)


def cmd_report(args: argparse.Namespace) -> int:
    from analysis.report import build_report

    run_dir = check_run_dir(args.run_dir)
    if args.measure_latency:
        measure_latency(run_dir, args.threads, args.repeats)
    elif args.threads is not None or args.repeats is not None:
        raise UserError("--threads and --repeats only apply with --measure-latency")
    summary = build_report(run_dir, args.out)
    print(summary["counts"])
    for note in summary["missing"]:
        print(f"  missing: {note}")
    for path in summary["files"]:
        print(f"wrote {path}")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from analysis.dashboard_app import serve

    check_run_dir(args.run_dir)
    if args.refresh <= 0:
        raise UserError("--refresh must be a positive number of seconds")
    if args.host not in LOOPBACK:
        print(
            f"warning: serving on {args.host}: the dashboard has no authentication; "
            "anyone who can reach this port can read the run",
            file=sys.stderr,
        )
    print(
        f"dashboard for {args.run_dir.resolve()} on http://{args.host}:{args.port}/ (Ctrl-C stops)"
    )
    serve(args.run_dir, args.host, args.port, args.refresh)
    return 0
