"""The `corroprune` commands for what ships: export, predict, evaluate, bench-infer."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from trainables.config import DATASETS
from trainables.errors import UserError

EXPORT_SUFFIXES = {"compact": ".safetensors", "onnx": ".onnx", "onnx-int8": ".onnx"}
MODEL_HELP = "a run checkpoint (.pt), a compact export (.safetensors) or an ONNX export (.onnx)"


def _size(parser: argparse.ArgumentParser, default: tuple[int, int], text: str) -> None:
    parser.add_argument("--size", type=int, nargs=2, default=default, metavar=("H", "W"), help=text)


def _threads(value: str) -> int:
    threads = int(value)
    if threads < 1:
        raise argparse.ArgumentTypeError(f"{value}: at least 1")
    return threads


def add_deploy_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="compact sparse file, ONNX or static INT8 ONNX of a model")
    p.add_argument(
        "source",
        type=Path,
        help="final.pt / dense.pt / last.pt, a compact file, "
        "or (for onnx-int8) an fp32 ONNX export",
    )
    p.add_argument("--format", choices=tuple(EXPORT_SUFFIXES), required=True)
    p.add_argument("--fp16", action="store_true", help="compact: store non-zeros as float16")
    _size(p, (512, 512), "onnx: example input size (the graph takes any multiple of 32)")
    p.add_argument(
        "--calibration-images",
        type=int,
        help="onnx-int8: training images that calibrate activation ranges (default 64)",
    )
    p.add_argument("--data-root", type=Path, help="onnx-int8: the dataset's folder on this machine")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="overlays, masks and corroded area per class for images")
    p.add_argument("model", type=Path, help=MODEL_HELP)
    p.add_argument("images", type=Path, nargs="+", help="image files or folders")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=_threads, help="CPU threads (default: the runtime's)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="mIoU and per-class IoU of any model on a dataset split")
    p.add_argument("model", type=Path, help=MODEL_HELP)
    p.add_argument("--dataset", choices=DATASETS, help="default: the model's own")
    p.add_argument("--data-root", type=Path, help="the dataset's folder on this machine")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--threads", type=_threads, help="CPU threads (default: the runtime's)")
    p.add_argument("--out", type=Path, help="also write the scores here (JSON)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("bench-infer", help="latency, parameters, MACs, file size, peak memory")
    p.add_argument("models", type=Path, nargs="+", help=f"models to compare: {MODEL_HELP}")
    _size(p, (736, 1280), "input size (default: an NEA frame padded to 736x1280)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=_threads, default=os.cpu_count() or 1)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--json", type=Path, help="also write the measurements here")
    p.set_defaults(func=cmd_bench)


def _check_size(h: int, w: int) -> None:
    if h % 32 or w % 32 or h < 32 or w < 32:
        raise UserError(f"--size {h} {w}: height and width must be positive multiples of 32")


def _check_export_args(args: argparse.Namespace) -> None:
    want = EXPORT_SUFFIXES[args.format]
    if args.out.suffix.lower() != want:
        raise UserError(f"--out {args.out}: --format {args.format} writes a {want} file")
    _check_size(*args.size)
    int8_only = {"--calibration-images": args.calibration_images, "--data-root": args.data_root}
    given = [flag for flag, value in int8_only.items() if value is not None]
    if given and args.format != "onnx-int8":
        raise UserError(f"{', '.join(given)}: only for --format onnx-int8")
    if args.calibration_images is not None and args.calibration_images < 1:
        raise UserError(f"--calibration-images {args.calibration_images}: at least 1")


def cmd_export(args: argparse.Namespace) -> int:
    from deploy.artefacts import load_artefact
    from deploy.export import Int8Settings, export_compact, export_onnx, export_onnx_int8

    _check_export_args(args)
    source = load_artefact(args.source)
    h, w = args.size
    if args.format == "compact":
        export_compact(source.model, source.cfg, args.out, fp16=args.fp16)
        before, size = args.source.stat().st_size, args.out.stat().st_size
        print(
            f"compact model written to {args.out}: {size / 2**20:.2f} MiB "
            f"({100 * size / before:.1f}% of the {before / 2**20:.2f} MiB {source.kind} file)"
        )
    elif args.format == "onnx":
        error = export_onnx(source.model, source.cfg, args.out, height=h, width=w)
        print(
            f"ONNX model written to {args.out}; onnxruntime matches torch (max abs diff {error:.2e})"
        )
    else:
        settings = Int8Settings(args.calibration_images or 64, args.data_root, (h, w))
        check, used = export_onnx_int8(source, args.out, settings)
        print(
            f"INT8 ONNX model written to {args.out} ({args.out.stat().st_size / 2**20:.2f} MiB; "
            f"QDQ, S8S8, per-channel weights, calibrated on {used} training images); against "
            f"fp32 on {check.images} {'validation' if check.held_out else 'calibration'} images: "
            f"{check.agreement:.2%} of pixels the same class, max logit difference "
            f"{check.max_logit_diff:.3g}"
        )
    return 0


def _device_for(path: Path, device: str) -> str:
    """`device` resolved; an ONNX model's "auto" is the CPU (ONNX Runtime runs there)."""
    from trainables.engine import resolve_device

    if path.suffix.lower() == ".onnx":
        return "cpu" if device == "auto" else device  # the loader refuses anything but the CPU
    return resolve_device(device).type


def cmd_predict(args: argparse.Namespace) -> int:
    from deploy.artefacts import load_artefact
    from deploy.predict import collect_images, predict_files, summary

    model = load_artefact(
        args.model, threads=args.threads, device=_device_for(args.model, args.device)
    )
    images = collect_images(args.images)
    done, failed = predict_files(model, images, args.out)
    print(summary(done, failed, args.out))
    return 1 if failed else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from deploy.artefacts import load_artefact
    from deploy.evaluate import evaluate, evaluation_data, summary
    from trainables.checkpoint import write_json

    model = load_artefact(args.model, threads=args.threads)
    data = evaluation_data(model, args.dataset, args.data_root)
    result = evaluate(model, data, args.split)
    print(summary(result))
    if args.out:
        write_json(args.out, result)
        print(f"scores written to {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from deploy.artefacts import check_path
    from deploy.bench_infer import bench, table
    from trainables.checkpoint import write_json

    for path in args.models:
        check_path(path)
    h, w = args.size
    _check_size(h, w)
    if args.repeats < 1:
        raise UserError(f"--repeats {args.repeats}: at least 1")
    results = bench(args.models, h, w, args.repeats, args.threads, args.device)
    print(f"# batch 1, {h}x{w}, {args.device}, {args.threads} thread(s), {args.repeats} runs")
    print(table(results))
    if args.json:
        write_json(args.json, [asdict(r) for r in results])
    return 0
