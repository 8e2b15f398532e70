"""`corroprune sweep`, `demo` and `track`: parse flags into a sweep request, run it (or sync it)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sweep.config import load_preset, parse_set
from sweep.grid import SweepConfig, parse_roots
from trainables.config import merge
from trainables.errors import UserError

SEEDS_HELP = (
    "comma-separated training seeds, e.g. 0,1,2: each trains its own dense base and pruned "
    "trials on the same split (default: the preset's)"
)


def add_sweep_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="every (dataset, model, pruner, sparsity) as a Ray Tune trial")
    p.add_argument("--preset", default="paper", help="shipped preset name or a YAML file")
    p.add_argument("--datasets", help="comma-separated: synthetic,sscs,nea,folder")
    p.add_argument("--models", help="comma-separated subset of unet,unetplusplus,fpn,linknet,manet")
    p.add_argument("--pruners", help="comma-separated subset of lp,agp,mp,magnitude")
    p.add_argument("--sparsities", help="comma-separated, e.g. 0.2,0.5,0.9")
    p.add_argument(
        "--granularities", help="comma-separated: element (the paper), channel (physically slim)"
    )
    p.add_argument("--seeds", help=SEEDS_HELP)
    p.add_argument(
        "--data-root",
        action="append",
        default=[],
        metavar="[DATASET=]PATH",
        help="dataset folder, e.g. --data-root sscs=/data/sscs (repeatable)",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="RUN_DIR: results, checkpoints, Ray state"
    )
    p.add_argument("--address", help="Ray cluster address (default: a local Ray on this machine)")
    p.add_argument("--gpus-per-trial", type=float)
    p.add_argument("--cpus-per-trial", type=float)
    p.add_argument("--max-concurrent", type=int)
    p.add_argument(
        "--deploy-int8",
        action=argparse.BooleanOptionalAction,
        help="after each trial, export its final model as static INT8 ONNX and record its test "
        "mIoU and latency beside the fp32 ones (default: the preset's sweep.deploy_int8, off); "
        "may be switched on when resuming a RUN_DIR",
    )
    p.add_argument(
        "--skip-data-check",
        action="store_true",
        help="start the trials without validating every dataset file first",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a trial config field for every trial, e.g. --set stages.train_epochs=10",
    )
    add_tracking_arguments(p)
    p.set_defaults(func=cmd_sweep)


# ---- experiment tracking (sweep/tracking.py) ----
def add_tracking_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mlflow",
        metavar="URI",
        help="also log every trial to MLflow: sqlite:///runs/mlflow.db (offline) or a server's "
        "http(s):// URI (needs pip install 'corroprune[mlflow]')",
    )
    p.add_argument(
        "--no-tensorboard",
        dest="tensorboard",
        action="store_false",
        help="write no TensorBoard event files (default: RUN_DIR/tensorboard/<trial name>/)",
    )


def add_track_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "track", help="sync a RUN_DIR (running or finished) into MLflow and TensorBoard files"
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    add_tracking_arguments(p)
    p.set_defaults(func=cmd_track)


def cmd_track(args: argparse.Namespace) -> int:
    from sweep.tracking import log_run, write_tensorboard

    run_dir = args.run_dir.resolve()
    if not (run_dir / "trials").is_dir():
        raise UserError(f"{args.run_dir}: not a sweep folder (no trials/ in it)")
    if args.tensorboard:
        print(f"TensorBoard: tensorboard --logdir {write_tensorboard(run_dir)}")
    if args.mlflow:
        print(f"MLflow: run {log_run(run_dir, args.mlflow)} '{run_dir.name}' in {args.mlflow}")
    return 0


# ---- end of experiment tracking ----


def add_demo_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the full 5x3x3 sweep on synthetic data, in CPU minutes")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--seeds", help=SEEDS_HELP)
    add_tracking_arguments(p)
    p.set_defaults(
        func=cmd_demo,
        preset="demo",
        datasets=None,
        models=None,
        pruners=None,
        sparsities=None,
        granularities=None,
        data_root=[],
        address=None,
        gpus_per_trial=None,
        cpus_per_trial=None,
        max_concurrent=None,
        deploy_int8=None,
        skip_data_check=False,
        set=[],
    )


def build_request(args: argparse.Namespace):
    from sweep.tracking import check_mlflow_uri
    from sweep.tune import SweepRequest

    preset = load_preset(args.preset)
    raw = dict(preset.get("sweep") or {})
    flags = {
        "datasets": args.datasets,
        "models": args.models,
        "pruners": args.pruners,
        "sparsities": args.sparsities,
        "granularities": args.granularities,
        "seeds": args.seeds,
        "gpus_per_trial": args.gpus_per_trial,
        "cpus_per_trial": args.cpus_per_trial,
        "max_concurrent": args.max_concurrent,
        "deploy_int8": args.deploy_int8,
    }
    raw.update({k: v for k, v in flags.items() if v is not None})
    sweep = SweepConfig.from_dict(raw)
    template = merge(preset.get("trial") or {}, parse_set(args.set))
    return SweepRequest(
        preset=args.preset,
        sweep=sweep,
        template=template,
        run_dir=args.out.resolve(),
        roots=parse_roots(args.data_root, sweep.datasets),
        address=args.address,
        check_data=not args.skip_data_check,
        mlflow=check_mlflow_uri(args.mlflow) if args.mlflow else None,
        tensorboard=args.tensorboard,
    )


def cmd_sweep(args: argparse.Namespace) -> int:
    from sweep.tune import run_sweep

    status = run_sweep(build_request(args))
    failed = [n for stage in ("dense", "pruned") for n, e in status[stage].items() if e]
    return 1 if failed or status["dropped_combinations"] else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from analysis.report import build_report

    code = cmd_sweep(args)
    run_dir = args.out.resolve()
    report = build_report(run_dir)
    if args.mlflow:  # the report exists only now: attach it to the sweep's MLflow run
        from sweep.tracking import log_run

        log_run(run_dir, args.mlflow)
    print(
        f"demo finished: every trial's records, checkpoints and final metrics are in {run_dir}/trials"
    )
    print(f"report: {report['counts']}")
    print(f"open the dashboard: {run_dir / 'report' / 'dashboard.html'}")
    return code


def add_tune_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="search a finished sweep: its fine-tuning (--preset finetune-hpo) or the most "
        "accurate model under a latency budget (--preset budget-search --budget-ms MS)",
    )
    p.add_argument("--preset", default="finetune-hpo", help="finetune-hpo, budget-search or a YAML")
    p.add_argument(
        "--from", dest="run_dir", type=Path, required=True, help="a finished sweep's RUN_DIR"
    )
    p.add_argument(
        "--select",
        help="e.g. model=fpn,pruner=agp,sparsity=0.9,seed=0 (keys: the trial identity;"
        " default: every pruned trial; budget search: the dataset and seed to start from)",
    )
    p.add_argument("--samples", type=int, help="configurations (per combination for finetune-hpo)")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    p.add_argument("--out", type=Path, required=True, help="TUNE_DIR / SEARCH_DIR")
    budget = p.add_argument_group("budget search (--preset budget-search)")
    budget.add_argument(
        "--budget-ms",
        type=float,
        help="latency budget: batch-1 milliseconds at the test images' size, measured here",
    )
    budget.add_argument(
        "--runtime",
        default="onnx",
        help="runtime the budget holds for: onnx (ONNX Runtime fp32, default), onnx-int8, torch",
    )
    budget.add_argument(
        "--threads", type=int, help="CPU threads of every latency measurement (default: up to 4)"
    )
    p.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    if args.samples is not None and args.samples < 1:
        raise UserError(f"--samples {args.samples}: at least 1")
    preset = load_preset(args.preset)
    if "budget" in preset:
        return cmd_budget(args, preset)
    if args.budget_ms is not None:
        raise UserError(
            f"--budget-ms: preset '{args.preset}' is not a budget search (use --preset "
            "budget-search)"
        )
    from analysis.tuning import write_tuning_report
    from sweep.hpo import run_search

    run_search(preset, args.run_dir, args.select, args.samples, args.out, args.address)
    report = write_tuning_report(args.out)
    print(
        f"search results in {args.out.resolve()}: summary.json, <combination>/best.json, trials.csv"
    )
    print(f"report: {report}")
    return 0


def cmd_budget(args: argparse.Namespace, preset: dict) -> int:
    from analysis.latency import default_threads
    from sweep.budget import BudgetRequest, run_budget_search, settings_from
    from sweep.hpo import parse_select

    if args.budget_ms is None:
        raise UserError("the budget search needs --budget-ms MS (batch-1 latency in milliseconds)")
    settings = settings_from(
        preset, args.budget_ms, args.runtime, args.threads or default_threads(), args.samples
    )
    request = BudgetRequest(
        settings, args.run_dir, args.out, parse_select(args.select), args.address
    )
    results = run_budget_search(request)
    chosen = results["chosen"]
    print(
        f"chosen: {chosen['trial_id']} ({chosen['arch']}, {chosen['pruner']}, sparsity "
        f"{chosen['sparsity']:g}): validation mIoU {chosen['val_miou']:.4f}, test mIoU "
        f"{chosen['test_miou']:.4f}, {chosen['artefact_latency_ms']:.2f} ms in "
        f"{results['runtime']}; artefact {chosen['artefact']}"
    )
    return 0
