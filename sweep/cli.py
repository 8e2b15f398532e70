"""The `corroprune` command line: data tools, one trial, the sweep, deployment, reports."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from analysis.cli import add_report_commands
from deploy.cli import add_deploy_commands
from sweep.tune_cli import (
    add_demo_command,
    add_sweep_command,
    add_track_command,
    add_tune_command,
)
from trainables.errors import UserError

FORMATS = ("sscs", "nea", "folder", "synthetic")


def _quiet_environment() -> None:
    """No network at run time: never ask the hub or PyPI anything unless the user opted in."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def add_data_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="generate, validate and describe datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)

    synth = dsub.add_parser("synth", help="write the built-in synthetic corrosion set")
    synth.add_argument("out", type=Path)
    synth.add_argument("--train", type=int, default=64)
    synth.add_argument("--test", type=int, default=16)
    synth.add_argument("--size", type=int, default=128)
    synth.add_argument("--classes", type=int, choices=(3, 4), default=4)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=cmd_data_synth)

    for name, func, text in (
        ("check", cmd_data_check, "validate every image/mask pair; exit 1 if any is bad"),
        ("stats", cmd_data_stats, "per-class pixel distribution per split"),
    ):
        p = dsub.add_parser(name, help=text)
        p.add_argument("root", type=Path)
        p.add_argument("--format", choices=FORMATS, required=True)
        p.add_argument(
            "--sscs-variant",
            choices=("auto", "512x512", "original"),
            default="auto",
            help="SSCS folder set to read; auto: the one present (512x512 when both are)",
        )
        p.add_argument("--num-classes", type=int, default=None)
        p.set_defaults(func=func)


def cmd_data_synth(args: argparse.Namespace) -> int:
    from trainables.data.synth import write_synthetic

    if args.train < 1 or args.test < 1 or args.size < 32:
        raise UserError("--train and --test must be at least 1 and --size at least 32")
    out = write_synthetic(
        args.out,
        train=args.train,
        test=args.test,
        size=args.size,
        classes=args.classes,
        seed=args.seed,
    )
    print(f"synthetic set written to {out}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from trainables.data.check import check_dataset, resolve_sscs_variant

    variant = resolve_sscs_variant(args.root, args.sscs_variant)
    if args.format == "sscs" and args.sscs_variant == "auto" and args.root.is_dir():
        print(f"SSCS variant {variant} (detected; --sscs-variant chooses)")
    problems = check_dataset(
        args.root, args.format, sscs_variant=variant, num_classes=args.num_classes
    )
    for problem in problems:
        print(f"{problem.path}: {problem.reason}")
    if problems:
        print(f"{len(problems)} problem(s) found in {args.root}", file=sys.stderr)
        return 1
    print(f"{args.root}: all image/mask pairs are valid")
    return 0


def cmd_data_stats(args: argparse.Namespace) -> int:
    from trainables.data.check import class_distribution, resolve_sscs_variant

    variant = resolve_sscs_variant(args.root, args.sscs_variant)
    if args.format == "sscs" and args.sscs_variant == "auto" and args.root.is_dir():
        print(f"SSCS variant {variant} (detected; --sscs-variant chooses)")
    table = class_distribution(
        args.root, args.format, sscs_variant=variant, num_classes=args.num_classes
    )
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return 0


def add_train_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run one trial (train -> prune -> fine-tune) without Ray")
    p.add_argument("--preset", default="demo", help="shipped preset name or a YAML file")
    p.add_argument("--dataset", choices=("synthetic", "sscs", "nea", "folder"))
    p.add_argument("--data-root", type=Path)
    p.add_argument("--model", help="unet | unetplusplus | fpn | linknet | manet")
    p.add_argument("--encoder")
    p.add_argument("--encoder-weights", help="imagenet | none | path to an encoder state dict")
    p.add_argument("--pruner", help="none | lp | agp | mp | magnitude")
    p.add_argument("--sparsity", type=float)
    p.add_argument("--scope", help="layer | global")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument(
        "--from",
        dest="warm_start",
        type=Path,
        help="start from a dense checkpoint (dense.pt) and skip the training stage",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set optim.max_lr=0.02 (repeatable)",
    )
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_train)


def train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Flags as a nested override dict; --set is applied last."""
    from sweep.config import parse_set
    from trainables.config import merge

    flags = {
        ("data", "dataset"): args.dataset,
        ("data", "root"): str(args.data_root.resolve()) if args.data_root else None,
        ("model", "arch"): args.model,
        ("model", "encoder"): args.encoder,
        ("model", "encoder_weights"): args.encoder_weights,
        ("pruning", "pruner"): args.pruner,
        ("pruning", "sparsity"): args.sparsity,
        ("pruning", "scope"): args.scope,
        ("runtime", "device"): args.device,
        ("seed",): args.seed,
    }
    out: dict[str, Any] = {}
    for path, value in flags.items():
        if value is None:
            continue
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return merge(out, parse_set(args.set))


def cmd_train(args: argparse.Namespace) -> int:
    from sweep.config import load_preset, trial_config
    from trainables.trial import run_trial

    cfg = trial_config(load_preset(args.preset), train_overrides(args))
    if args.warm_start is not None and not cfg.pruned:
        raise UserError("--from starts from a dense checkpoint to prune it: also give --pruner")
    result = run_trial(cfg, args.out, warm_start=args.warm_start)
    print(summary_line(result, args.out))
    return 0


def summary_line(result: dict[str, Any], out: Path) -> str:
    dense = result["dense"]
    lines = [
        f"dense test mIoU {dense['test_miou']:.4f} (corrosion classes "
        f"{dense['test_miou_corrosion']:.4f}); predicting all background would score "
        f"{dense['test_all_background_miou']:.4f}"
    ]
    if result.get("pruned"):
        p = result["pruned"]
        lines.append(
            f"pruned test mIoU {p['test_miou']:.4f} at sparsity {result['achieved_sparsity']:.3f} "
            f"({result['nonzero_params']:,} of {result['total_params']:,} parameters non-zero)"
        )
    lines.append(f"results in {Path(out).resolve()}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corroprune",
        description="Pruned, lightweight corrosion segmentation models and the evidence of their cost.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_data_commands(sub)
    add_train_command(sub)
    add_deploy_commands(sub)  # deploy/cli.py: export, predict, evaluate, bench-infer
    add_sweep_command(sub)
    add_demo_command(sub)
    add_tune_command(sub)
    add_track_command(sub)  # sweep/tracking.py
    add_report_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_environment()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"corroprune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("corroprune: interrupted; checkpoints written so far are intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
