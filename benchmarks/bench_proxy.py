"""Accuracy at matched latency on a CPU proxy: coupled pruning against Torch-Pruning's pipeline, fp32 and INT8.

    python benchmarks/bench_proxy.py --out runs/proxy/results.json [--seeds 0,1,2]
        [--sparsities 0.5,0.75,0.9] [--arch fpn] [--encoder resnet18] [--size 128]
        [--train-images 64] [--test-images 16] [--train-epochs 12] [--prune-epochs 4]
        [--finetune-epochs 4] [--steps 4] [--taylor-batches 10] [--threads 1]
    python benchmarks/bench_proxy.py --latency-from runs/proxy/results.json [--size 512]
        [--threads 2] [--repeats 20]

Accuracy pass, per seed, on the built-in synthetic set (the same images for every seed; the seed
drives initialisation, augmentation and order), everything in the folder of `--out`:

1. dense: one trial of the project's own machinery (`run_trial`; Tversky, SGD momentum 0.5, the
   triangular cyclical LR with a fresh schedule per stage, as the config defaults have them; the
   half-cycle scaled so that the prune stage is one full cycle, as the paper's 50 epochs are).
2. coupled: per sparsity, a trial warm-started from the dense checkpoint (the sweep's stage 2):
   `pruning.granularity: coupled`, AGP with first-order Taylor scores accumulated over every
   step of each interval, `--steps` mask updates in the prune stage, masks fixed while
   fine-tuning; deployed slim (`final.pt` through deploy's loader).
3. Torch-Pruning 1.6.1's own pipeline from the same dense weights: `MetaPruner` with
   `GroupTaylorImportance` and its linear iterative schedule, `iterative_steps = --steps`, one
   step at the end of the same epochs where corroprune updates its masks, each on gradients
   accumulated over `--taylor-batches` training batches right before it (its benchmark's
   default is 10); `pruning_ratio` found by bisection on dry runs so that the final parameter
   count is the coupled model's at the same sparsity. Trained with the trial's own loss, loaders
   (same data order and augmentation per epoch), optimiser and scheduler (`trainables.engine`),
   the same prune and fine-tuning epochs; after each pruning step the optimiser gets the new
   parameters (momentum restarts; the LR schedule runs on).

Every model is scored on the test split with `deploy.evaluate.evaluate` (one confusion matrix,
mIoU over the classes present): torch fp32, ONNX Runtime fp32 (`export_onnx`) and static INT8
(`export_onnx_int8`: calibrated on the trial's own training images, checked against fp32 on
validation images). Records go to `--out` (JSON), with the files the latency pass reloads.

Latency pass (`--latency-from`): every saved model, batch 1, through torch, ONNX Runtime fp32 and
INT8 with `--threads` threads, one after the other in one process, at `--size` px (default: the
training size); writes `latency-<size>.json` and `table-<size>.md` beside the results. The matched
comparison interpolates each seed's Torch-Pruning curve (its dense model at ratio 0 and every
pruned one) linearly in latency at each coupled model's latency, per runtime (INT8 mIoU for the
INT8 runtime, fp32 otherwise); points outside that curve are left out.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import os
import shlex
import statistics
import sys
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_coupled, beside this file

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch_pruning as tp  # noqa: E402
from bench_coupled import EXCLUDE, tp_graph, tp_pruner  # noqa: E402
from torch import nn  # noqa: E402

from deploy.artefacts import Artefact, TorchRunner, load_artefact, names_of  # noqa: E402
from deploy.evaluate import evaluate  # noqa: E402
from deploy.export import Int8Settings, export_onnx, export_onnx_int8  # noqa: E402
from trainables import engine  # noqa: E402
from trainables.checkpoint import load_checkpoint, save_checkpoint, write_json  # noqa: E402
from trainables.config import TrialConfig  # noqa: E402
from trainables.cost import cpu_name, gmacs, latency_ms  # noqa: E402
from trainables.data import build_datasets  # noqa: E402
from trainables.data.dataset import epoch_seed  # noqa: E402
from trainables.errors import UserError  # noqa: E402
from trainables.models import build_model  # noqa: E402
from trainables.pruning import coupled  # noqa: E402
from trainables.trial import run_trial  # noqa: E402

METHODS = {"dense": "dense", "coupled": "corroprune coupled (AGP, Taylor)", "tp": "Torch-Pruning"}
RUNTIMES = {"torch": "torch", "onnx": "ORT fp32", "onnx-int8": "ORT INT8"}


# ---- configuration ------------------------------------------------------------------------------


def base_config(args: argparse.Namespace, seed: int) -> TrialConfig:
    """The dense trial's config; pruned ones add a `pruning` section."""
    config = {
        "seed": seed,
        "data": {
            "dataset": "synthetic",
            "crop_size": args.size,
            "synthetic": {
                "train": args.train_images,
                "test": args.test_images,
                "size": args.size,
                "classes": 4,
                "seed": 0,
            },
        },
        "model": {"arch": args.arch, "encoder": args.encoder, "encoder_weights": None},
        "loss": {"ce_weight": args.ce_weight},
        "optim": {"max_lr": args.max_lr, "half_cycle_iters": 1},
        "stages": {
            "train_epochs": args.train_epochs,
            "prune_epochs": args.prune_epochs,
            "finetune_epochs": args.finetune_epochs,
        },
        "runtime": {
            "device": "cpu",
            "threads": args.threads,
            "progress": False,
            "latency_repeats": 0,
        },
    }
    cfg = TrialConfig.from_dict(config)
    iters = len(build_datasets(cfg.data, seed).train) // cfg.optim.batch_size
    half = args.half_cycle_iters or max(1, args.prune_epochs * iters // 2)
    return cfg.replace(optim={"half_cycle_iters": half})


def unfinished_cycles(cfg: TrialConfig) -> list[str]:
    """Stages that end inside an LR cycle (at a high rate) rather than at its end."""
    iters = len(build_datasets(cfg.data, cfg.seed).train) // cfg.optim.batch_size
    cycle = 2 * cfg.optim.half_cycle_iters
    stages = dataclasses.asdict(cfg.stages)
    return [f"{k} ({v * iters} iterations)" for k, v in stages.items() if v * iters % cycle]


def coupled_config(cfg: TrialConfig, sparsity: float, steps: int) -> TrialConfig:
    pruning = {"pruner": "agp", "granularity": "coupled", "sparsity": sparsity, "steps": steps}
    return cfg.replace(pruning=pruning)


# ---- Torch-Pruning's pipeline -------------------------------------------------------------------


def dense_model(cfg: TrialConfig, checkpoint: Path) -> nn.Module:
    model = build_model(dataclasses.replace(cfg.model, encoder_weights=None), cfg.data.classes)
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    return model


def params_of(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tp_params(dense: nn.Module, ratio: float, steps: int) -> int:
    """Parameters left by Torch-Pruning's schedule at `ratio` (a dry run on a copy; with one
    ratio per group the count does not depend on the scores)."""
    model = copy.deepcopy(dense)
    pruner, _ = tp_pruner(model, tp.importance.MagnitudeImportance(p=2), ratio, steps)
    for _ in range(steps):
        pruner.step()
    return params_of(model)


def matching_ratio(dense: nn.Module, params: int, steps: int, iterations: int = 10) -> float:
    """The pruning ratio whose final parameter count is closest to `params` (bisection)."""
    lo, hi = 0.0, 0.99
    counts = {lo: params_of(dense)}
    for _ in range(iterations):
        mid = (lo + hi) / 2
        counts[mid] = tp_params(dense, mid, steps)
        lo, hi = (mid, hi) if counts[mid] > params else (lo, mid)
    if hi not in counts:
        counts[hi] = tp_params(dense, hi, steps)
    return min((lo, hi), key=lambda r: abs(counts[r] - params))


def cached_ratio(root: Path, cfg: TrialConfig, ckpt: Path, params: int, steps: int) -> float:
    """`matching_ratio`, remembered in `root`/tp-ratios.json (the count depends on the
    architecture alone, so every seed's coupled model at one sparsity asks the same)."""
    path = root / "tp-ratios.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    key = f"{cfg.model.arch}/{cfg.model.encoder}/{params}/{steps}"
    if key not in known:
        known[key] = matching_ratio(dense_model(cfg, ckpt), params, steps)
        write_json(path, known)
    return known[key]


def refresh_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """After Torch-Pruning replaced the parameters: the new ones, no momentum (the scheduler,
    which holds the optimizer, runs on)."""
    optimizer.param_groups[0]["params"] = list(model.parameters())
    optimizer.state.clear()


def taylor_gradients(model: nn.Module, loader, loss_fn: nn.Module, batches: int) -> None:
    """Loss gradients summed over the first `batches` batches of `loader`, in training mode (what
    GroupTaylorImportance reads)."""
    model.train()
    model.zero_grad(set_to_none=True)
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        images, masks = engine.to_device(batch, torch.device("cpu"))  # (N, 3, H, W), (N, H, W)
        loss_fn(model(images), masks).backward()


@dataclasses.dataclass
class TpRun:
    """Torch-Pruning's pruned and fine-tuned model and what rebuilds it."""

    model: nn.Module
    history: list
    seconds: float


def run_tp(cfg: TrialConfig, checkpoint: Path, ratio: float, args: argparse.Namespace) -> TpRun:
    """Prune and fine-tune stages as a warm-started trial runs them, with Torch-Pruning."""
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    runtime, device = cfg.runtime.resolve("cpu"), torch.device("cpu")
    engine.seed_everything(cfg.seed)
    data = build_datasets(cfg.data, cfg.seed, runtime.augment)
    loader = engine.make_loader(
        data.train,
        cfg.optim.batch_size,
        train=True,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
    )
    model = dense_model(cfg, checkpoint)
    loss_fn = engine.build_loss(cfg.loss)
    pruner, _ = tp_pruner(model, tp.importance.GroupTaylorImportance(), ratio, args.steps)
    stages = cfg.stages
    interval = stages.prune_epochs // args.steps  # a step at the end of every interval
    global_epoch = 0
    for stage, epochs in (("prune", stages.prune_epochs), ("finetune", stages.finetune_epochs)):
        optimizer, scheduler = engine.build_optimizer(model, cfg.optim)  # fresh per stage
        for epoch in range(1, epochs + 1):
            global_epoch += 1
            torch.manual_seed(epoch_seed(cfg.seed, global_epoch))
            loader.sampler.set_epoch(global_epoch)
            engine.train_one_epoch(
                model, loader, loss_fn, optimizer, scheduler, device, runtime=runtime
            )
            if stage == "prune" and epoch % interval == 0:
                taylor_gradients(model, loader, loss_fn, args.taylor_batches)
                pruner.step()
                model.zero_grad(set_to_none=True)
                refresh_optimizer(optimizer, model)
    return TpRun(model.eval(), plain_history(pruner), time.perf_counter() - started)


def plain_history(pruner: tp.pruner.MetaPruner) -> list:
    """The pruner's history as plain lists (module name, output channels?, indices): what a
    weights-only checkpoint holds."""
    return [[n, bool(out), [int(i) for i in idxs]] for n, out, idxs in pruner.pruning_history()]


def save_tp(run: TpRun, cfg: TrialConfig, ratio: float, path: Path) -> None:
    state = {
        "model": run.model.state_dict(),
        "history": run.history,
        "config": cfg.to_dict(),
        "ratio": ratio,
    }
    save_checkpoint(state, path)


def load_tp(path: Path) -> tuple[nn.Module, TrialConfig]:
    """A saved Torch-Pruning model: the dense architecture, its pruning history replayed on
    Torch-Pruning's graph, then the pruned weights."""
    state = load_checkpoint(path)
    cfg = TrialConfig.from_dict(state["config"])
    model = build_model(cfg.model, cfg.data.classes)
    tp_graph(model).load_pruning_history([tuple(h) for h in state["history"]])
    model.load_state_dict(state["model"])
    return model.eval(), cfg


def tp_artefact(path: Path, threads: int) -> Artefact:
    model, cfg = load_tp(path)
    torch.set_num_threads(threads)
    return Artefact(path, "checkpoint", cfg, names_of(cfg), TorchRunner(model, torch.device("cpu")))


# ---- scoring ------------------------------------------------------------------------------------


def torch_artefact(record: dict[str, Any], root: Path, threads: int) -> Artefact:
    path = root / record["files"]["torch"]
    if record["method"] == "tp":
        return tp_artefact(path, threads)
    return load_artefact(path, threads=threads)


def counted_names(cfg: TrialConfig) -> tuple[str, ...]:
    """The prunable weights `pruning.sparsity` counts, by name (the same in every slim model)."""
    model = build_model(dataclasses.replace(cfg.model, encoder_weights=None), cfg.data.classes)
    return tuple(coupled.counted_weights(coupled.build_graph(model), EXCLUDE))


@dataclasses.dataclass(frozen=True)
class Pass:
    """What every model of one accuracy pass shares."""

    args: argparse.Namespace
    root: Path  # the folder of --out; file names in the records are relative to it
    counted: tuple[str, ...]  # `counted_names`

    def rel(self, path: Path) -> str:
        return str(path.resolve().relative_to(self.root.resolve()))


def score(artefact: Artefact, folder: Path, run: Pass) -> dict[str, Any]:
    """Size and test mIoU of a torch model through torch, ONNX Runtime fp32 and INT8; writes
    model.onnx and model.int8.onnx into `folder`."""
    cfg, model, size = artefact.cfg, artefact.model, run.args.size
    out = {
        "params": params_of(model),
        "counted_kept": sum(model.get_parameter(n).numel() for n in run.counted),
        "gmacs": gmacs(model, torch.randn(1, 3, size, size)),
        "miou": {"torch": evaluate(artefact, cfg.data)["miou"]},
        "files": {},
    }
    fp32, int8 = folder / "model.onnx", folder / "model.int8.onnx"
    export_onnx(model, cfg, fp32, height=size, width=size)
    exported = load_artefact(fp32, threads=run.args.threads)  # carries the config: no re-export
    settings = Int8Settings(calibration_images=run.args.calibration_images, size=(size, size))
    try:
        check, _ = export_onnx_int8(exported, int8, settings)
        out["int8_agreement"] = check.agreement
    except UserError as err:  # a quantisation too broken to ship: recorded, not scored
        out["int8_error"] = str(err)
    for runtime, path in (("onnx", fp32), ("onnx-int8", int8)):
        if path.exists():
            scored = load_artefact(path, threads=run.args.threads)
            out["miou"][runtime] = evaluate(scored, cfg.data)["miou"]
            out["files"][runtime] = run.rel(path)
    return out


def scored_record(folder: Path, base: dict[str, Any], artefact_of, run: Pass) -> dict[str, Any]:
    """`base` plus the model's scores, kept in `folder`/record.json (a rerun reuses it)."""
    path = folder / "record.json"
    if path.exists():
        return json.loads(path.read_text())
    record = {**base, **score(artefact_of(), folder, run)}
    record["files"] = {**base["files"], **record["files"]}
    write_json(path, record)
    return record


# ---- the accuracy pass --------------------------------------------------------------------------


def run_seed(seed: int, run: Pass) -> list[dict[str, Any]]:
    """Dense, then coupled and Torch-Pruning at each sparsity, for one seed."""
    cfg = base_config(run.args, seed)
    folder = run.root / f"seed{seed}" / "dense"
    result = run_trial(cfg, folder)
    ckpt = folder / "checkpoints" / "dense.pt"
    base = {"seed": seed, "method": "dense", "sparsity": 0.0, "train_s": result["wall_time_s"]}
    base["files"] = {"torch": run.rel(ckpt)}
    art = functools.partial(load_artefact, ckpt, threads=run.args.threads)
    records = [scored_record(folder, base, art, run)]
    for s in run.args.sparsities:
        records += run_sparsity(cfg, s, ckpt, run)
    return records


def run_sparsity(cfg: TrialConfig, s: float, ckpt: Path, run: Pass) -> list[dict[str, Any]]:
    """The coupled trial warm-started from `ckpt`, then Torch-Pruning at its parameter count."""
    args, seed_dir = run.args, ckpt.parents[2]
    folder = seed_dir / f"coupled-{s:g}"
    final = run_trial(coupled_config(cfg, s, args.steps), folder, warm_start=ckpt)
    final_pt = folder / "checkpoints" / "final.pt"
    base = {"seed": cfg.seed, "method": "coupled", "sparsity": s}
    base |= {"train_s": final["wall_time_s"], "trial_miou": final["pruned"]["test_miou"]}
    base["files"] = {"torch": run.rel(final_pt)}
    art = functools.partial(load_artefact, final_pt, threads=args.threads)
    out = [scored_record(folder, base, art, run)]
    folder = seed_dir / f"tp-{s:g}"
    path = folder / "tp.pt"
    if not path.exists():
        ratio = cached_ratio(run.root, cfg, ckpt, out[0]["params"], args.steps)
        pruned = run_tp(cfg, ckpt, ratio, args)
        save_tp(pruned, cfg, ratio, path)
        write_json(folder / "train.json", {"ratio": ratio, "train_s": pruned.seconds})
    meta = json.loads((folder / "train.json").read_text())
    base = {"seed": cfg.seed, "method": "tp", "sparsity": s, **meta}
    base["files"] = {"torch": run.rel(path)}
    art = functools.partial(tp_artefact, path, args.threads)
    out.append(scored_record(folder, base, art, run))
    return out


def accuracy_pass(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    root = out.parent
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = {"settings": settings(args), "machine": machine(), "models": []}
    cfg = base_config(args, args.seeds[0])
    run = Pass(args, root, counted_names(cfg))
    if unfinished := unfinished_cycles(cfg):
        cycle = 2 * cfg.optim.half_cycle_iters
        print(f"note: LR cycle {cycle} iterations; ends mid-cycle: {', '.join(unfinished)}")
    for seed in args.seeds:
        results["models"] += run_seed(seed, run)
        write_json(out, results)
    results["wall_s"] = time.perf_counter() - started
    write_json(out, results)
    return results


def settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = [
        "seeds",
        "sparsities",
        "arch",
        "encoder",
        "size",
        "train_images",
        "test_images",
        "train_epochs",
        "prune_epochs",
        "finetune_epochs",
        "steps",
        "taylor_batches",
        "ce_weight",
        "max_lr",
        "half_cycle_iters",
        "calibration_images",
        "threads",
    ]
    cfg = base_config(args, args.seeds[0])
    return {
        **{k: getattr(args, k) for k in keys},
        "config": cfg.to_dict(),
        "command": shlex.join(sys.argv),
    }


def machine() -> dict[str, Any]:
    pkgs = ("torch", "torch-pruning", "onnxruntime", "onnx", "segmentation-models-pytorch")
    return {
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "load_1min": os.getloadavg()[0],
        "versions": {p: version(p) for p in pkgs},
        "date": f"{datetime.now(UTC):%Y-%m-%d}",
    }


# ---- the latency pass ---------------------------------------------------------------------------


def _p50_p90(times: list[float]) -> list[float]:
    return [statistics.median(times), times[min(len(times) - 1, int(0.9 * len(times)))]]


def measure(record: dict[str, Any], root: Path, args: argparse.Namespace, size: int) -> dict:
    """(p50, p90) ms per runtime of one model, batch 1."""
    x = torch.randn(1, 3, size, size)  # (1, 3, H, W)
    artefact = torch_artefact(record, root, args.threads)
    out = {"torch": _p50_p90(latency_ms(artefact, x, args.repeats))}
    for runtime in ("onnx", "onnx-int8"):
        if runtime in record["files"]:
            ort = load_artefact(root / record["files"][runtime], threads=args.threads)
            out[runtime] = _p50_p90(latency_ms(ort, x.numpy(), args.repeats))
    return out


def latency_pass(args: argparse.Namespace) -> str:
    path = Path(args.latency_from)
    root = path.parent
    results = json.loads(path.read_text())
    size = args.size or results["settings"]["size"]
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    for record in results["models"]:
        record["latency"] = measure(record, root, args, size)
    results["latency"] = {
        "size": size,
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": machine(),
        "load_1min_start": load,
        "seconds": time.perf_counter() - started,
    }
    write_json(root / f"latency-{size}.json", results)
    text = report(results)
    (root / f"table-{size}.md").write_text(text + "\n")
    return text


# ---- tables -------------------------------------------------------------------------------------


def mean_sd(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def points(models: list[dict[str, Any]]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    """Records by (method, sparsity), in the order methods and sparsities first appear."""
    out: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for m in models:
        out.setdefault((m["method"], m["sparsity"]), []).append(m)
    return out


def label(record: dict[str, Any]) -> str:
    method, s = record["method"], record["sparsity"]
    if method == "tp":
        return f"{METHODS[method]} ratio {record['ratio']:.3f} (params of coupled {s:g})"
    return "dense" if method == "dense" else f"{METHODS[method]} {s:g}"


def summary_table(results: dict[str, Any]) -> list[str]:
    """Per method and sparsity, over seeds: size, mIoU fp32 / INT8, and latencies if measured."""
    timed = "latency" in results
    runtimes = [r for r in RUNTIMES if timed]
    head = "| model | pruned | params M | GMACs | mIoU torch | mIoU ORT INT8 | INT8 − fp32 |"
    head += "".join(f" {RUNTIMES[r]} ms | speed-up |" for r in runtimes)
    lines = [head, "|" + " --- |" * (7 + 2 * len(runtimes))]
    groups = points(results["models"])
    dense = groups[("dense", 0.0)]
    kept0 = statistics.mean(d["counted_kept"] for d in dense)
    base = statistics.mean(d["latency"]["torch"][0] for d in dense) if timed else 0
    for recs in groups.values():
        fp32 = [r["miou"]["torch"] for r in recs]
        int8 = [r["miou"].get("onnx-int8") for r in recs]
        diff = [b - a for a, b in zip(fp32, int8, strict=True) if b is not None]
        row = (
            f"| {label(recs[0])} | {1 - recs[0]['counted_kept'] / kept0:.3f} | "
            f"{recs[0]['params'] / 1e6:.2f} | {recs[0]['gmacs']:.2f} | {mean_sd(fp32)} | "
            f"{mean_sd(int8)} | {mean_sd(diff)} |"
        )
        for r in runtimes:
            ms = statistics.mean(x["latency"][r][0] for x in recs if r in x["latency"])
            row += f" {ms:.1f} | {base / ms:.2f}x |"
        lines.append(row)
    return lines


def seed_table(results: dict[str, Any]) -> list[str]:
    """mIoU per seed: torch fp32 / ORT INT8."""
    seeds = sorted({m["seed"] for m in results["models"]})
    lines = [
        "| model | " + " | ".join(f"seed {s} fp32 / INT8" for s in seeds) + " |",
        "|" + " --- |" * (1 + len(seeds)),
    ]
    for recs in points(results["models"]).values():
        by_seed = {r["seed"]: r["miou"] for r in recs}
        cells = []
        for seed in seeds:
            m = by_seed.get(seed)
            int8 = m.get("onnx-int8") if m else None
            cells.append("" if m is None else f"{m['torch']:.3f} / " + _fmt(int8))
        lines.append(f"| {label(recs[0])} | " + " | ".join(cells) + " |")
    return lines


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def paired_table(results: dict[str, Any]) -> list[str]:
    """Coupled against Torch-Pruning at equal parameters, paired by seed."""
    groups = points(results["models"])
    lines = [
        "| sparsity | params coupled / TP (M) | GMACs coupled / TP | TP ratio | "
        "Δ mIoU fp32 (coupled − TP) | Δ mIoU INT8 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (method, s), recs in groups.items():
        if method != "coupled" or ("tp", s) not in groups:
            continue
        tps = {r["seed"]: r for r in groups[("tp", s)]}
        pairs = [(c, tps[c["seed"]]) for c in recs if c["seed"] in tps]
        if not pairs:
            continue
        c0, t0 = pairs[0]
        d32 = [c["miou"]["torch"] - t["miou"]["torch"] for c, t in pairs]
        d8 = [
            c["miou"]["onnx-int8"] - t["miou"]["onnx-int8"]
            for c, t in pairs
            if "onnx-int8" in c["miou"] and "onnx-int8" in t["miou"]
        ]
        lines.append(
            f"| {s:g} | {c0['params'] / 1e6:.3f} / {t0['params'] / 1e6:.3f} | "
            f"{c0['gmacs']:.2f} / {t0['gmacs']:.2f} | {t0['ratio']:.3f} | {mean_sd(d32)} | "
            f"{mean_sd(d8)} |"
        )
    return lines


def interpolated(curve: list[tuple[float, float]], latency: float) -> float:
    """mIoU on a (latency, mIoU) curve at `latency`, linear; NaN outside it."""
    xs, ys = zip(*sorted(curve), strict=True)
    if not xs[0] <= latency <= xs[-1]:
        return float("nan")
    return float(np.interp(latency, xs, ys))


def matched_table(results: dict[str, Any]) -> list[str]:
    """Coupled against Torch-Pruning interpolated at the coupled model's latency, per seed."""
    lines = [
        "| coupled sparsity | runtime | coupled ms | coupled mIoU | TP mIoU at that latency | "
        "Δ (coupled − TP) | seeds in range |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    models = results["models"]
    for s in sorted({m["sparsity"] for m in models if m["method"] == "coupled"}):
        for runtime, title in RUNTIMES.items():
            key = "onnx-int8" if runtime == "onnx-int8" else "torch"
            ms, mine, theirs = [], [], []
            for c in (m for m in models if m["method"] == "coupled" and m["sparsity"] == s):
                curve = [
                    (m["latency"][runtime][0], m["miou"][key])
                    for m in models
                    if m["seed"] == c["seed"]
                    and m["method"] in ("dense", "tp")
                    and runtime in m["latency"]
                    and key in m["miou"]
                ]
                if runtime not in c["latency"] or key not in c["miou"] or len(curve) < 2:
                    continue
                ms.append(c["latency"][runtime][0])
                mine.append(c["miou"][key])
                theirs.append(interpolated(curve, ms[-1]))
            ok = [i for i, t in enumerate(theirs) if np.isfinite(t)]
            diff = [mine[i] - theirs[i] for i in ok]
            lines.append(
                f"| {s:g} | {title} | {mean_sd(ms, 1)} | {mean_sd(mine)} | "
                f"{mean_sd([theirs[i] for i in ok])} | {mean_sd(diff)} | {len(ok)}/{len(mine)} |"
            )
    return lines


def report(results: dict[str, Any]) -> str:
    s, m = results["settings"], results["machine"]
    lines = [
        f"# {s['arch']} / {s['encoder']}, synthetic {s['size']} px ({s['train_images']} train "
        f"/ {s['test_images']} test images), {s['train_epochs']} dense + {s['prune_epochs']} "
        f"prune ({s['steps']} steps) + {s['finetune_epochs']} fine-tuning epochs, seeds "
        f"{', '.join(map(str, s['seeds']))}; {m['cpu']}, "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
    ]
    if "latency" in results:
        lat = results["latency"]
        lines.append(
            f"# latency: batch 1, {lat['size']} px, {lat['threads']} thread(s), "
            f"{lat['repeats']} runs (each model's median, averaged over seeds), 1-min load "
            f"{lat['load_1min_start']:.1f} at start, {lat['seconds']:.0f} s"
        )
    lines += ["", "mIoU (mean ± sd over seeds):", "", *summary_table(results)]
    lines += ["", "mIoU per seed (torch fp32 / ORT INT8):", "", *seed_table(results)]
    lines += ["", "Equal parameters, paired by seed:", "", *paired_table(results)]
    if "latency" in results:
        lines += ["", "Matched latency (Torch-Pruning's curve with dense at ratio 0):", ""]
        lines += matched_table(results)
    return "\n".join(lines)


# ---- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="results JSON of the accuracy pass (models beside it)")
    p.add_argument("--latency-from", help="results JSON of an accuracy pass to time")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--sparsities", default="0.5,0.75,0.9")
    p.add_argument("--arch", default="fpn")
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--size", type=int, default=None, help="px (default 128; latency: as trained)")
    p.add_argument("--train-images", type=int, default=64, help="before the 80/20 train/val split")
    p.add_argument("--test-images", type=int, default=16)
    p.add_argument("--train-epochs", type=int, default=12)
    p.add_argument("--prune-epochs", type=int, default=4)
    p.add_argument("--finetune-epochs", type=int, default=4)
    p.add_argument("--steps", type=int, default=4, help="pruning steps (mask updates)")
    p.add_argument("--taylor-batches", type=int, default=10)
    p.add_argument("--ce-weight", type=float, default=0.0, help="loss.ce_weight (0: pure Tversky)")
    p.add_argument("--max-lr", type=float, default=1e-2)
    p.add_argument("--half-cycle-iters", type=int, default=None, help="default: prune stage / 2")
    p.add_argument("--calibration-images", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="default 1 (accuracy), 2 (latency)")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    if bool(args.out) == bool(args.latency_from):
        p.error("give either --out (accuracy pass) or --latency-from (latency pass)")
    args.seeds = [int(v) for v in args.seeds.split(",") if v]
    args.sparsities = [float(v) for v in args.sparsities.split(",") if v]
    if args.out:
        args.size = args.size or 128
        if args.prune_epochs % args.steps:
            p.error("--prune-epochs must be a multiple of --steps (a step every interval)")
    args.threads = args.threads or (2 if args.latency_from else 1)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started, load = time.perf_counter(), os.getloadavg()[0]
    if args.latency_from:
        print(latency_pass(args))
    else:
        print(report(accuracy_pass(args)))
    print(
        f"\n`python {shlex.join(sys.argv)}`; {os.cpu_count()} CPUs, 1-min load average "
        f"{load:.1f} at start and {os.getloadavg()[0]:.1f} at the end, "
        f"{time.perf_counter() - started:.0f} s in all"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
