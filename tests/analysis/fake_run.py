"""A fake but schema-true run directory, as the sweep writes it, for the analysis tests.

Synthetic trials carry final.json's `inference` block (size and latency) and element-wise configs;
NEA trials are written as by a run from before channel pruning: no `inference`, no granularity.
A few channel-pruned synthetic trials sit beside the grid's element-wise ones.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from analysis.collect import Run

CLASSES = {
    "synthetic": ["good", "fair", "poor", "severe"],
    "nea": ["background", "corroded_c1", "corroded_c2"],
}
DENSE_MIOU = {"fpn": 0.70, "linknet": 0.68, "unet": 0.62}
# Relative mIoU drop per pruner and sparsity: LP/AGP small up to 0.5, MP worst at 0.2.
DROP = {
    "lp": {0.2: 0.01, 0.5: 0.03, 0.9: 0.08},
    "agp": {0.2: 0.005, 0.5: 0.02, 0.9: 0.06},
    "mp": {0.2: 0.15, 0.5: 0.10, 0.9: 0.12},
}
CHANNEL_DROP = {0.5: 0.05, 0.9: 0.15}  # AGP at channel granularity: more loss, real speed-up
MODEL_DROP_FACTOR = {"fpn": 1.0, "linknet": 1.1, "unet": 1.5}
DENSE_MIB = {"fpn": 40.0, "linknet": 45.0, "unet": 60.0}  # dense fp32 state dict
DENSE_MS = {"fpn": 20.0, "linknet": 18.0, "unet": 30.0}  # median batch-1 CPU latency
CHANNEL_TRIALS = tuple(
    f"synthetic-{m}-agp-channel-s{s:g}" for m in ("fpn", "linknet") for s in CHANNEL_DROP
)
NO_LATENCY = "synthetic-unet-lp-s0.2"  # inference measured without latency (latency_ms null)
TRAIN_EPOCHS, PRUNE_EPOCHS, FINETUNE_EPOCHS, STEPS = 6, 4, 3, 2
ERRORED = "synthetic-unet-mp-s0.9"
RUNNING = "nea-linknet-agp-s0.9"
NOT_STARTED = "nea-unet-lp-s0.2"
K, SIZE = 2, 16


def _dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1))


def _ious(miou: float, n: int) -> list[float]:
    """Per-class IoUs with the given mean: background high, corrosion classes lower."""
    spread = np.linspace(0.25, -0.25, n)
    spread -= spread.mean()
    return [float(np.clip(miou + s, 0, 1)) for s in spread]


def _record(stage: str, epoch: int, global_epoch: int, miou: float, n: int, **extra) -> dict:
    iou = _ious(miou, n)
    return {
        "stage": stage,
        "epoch": epoch,
        "global_epoch": global_epoch,
        "lr": 0.01,
        "train_loss": 1.0 - miou,
        "val_loss": 1.1 - miou,
        "val_miou": miou,
        "val_miou_corrosion": float(np.mean(iou[1:])),
        "val_iou": iou,
        "target_sparsity": 0.0,
        "achieved_sparsity": 0.0,
        "overall_sparsity": 0.0,
        "nonzero_params": 1000,
        "total_params": 1000,
        "mask_updated": False,
        "time_s": 0.1,
        **extra,
    }


def _dense_records(dense: float, n: int, rng: np.random.Generator) -> list[dict]:
    ramp = dense * (1 - np.exp(-np.arange(1, TRAIN_EPOCHS + 1) / 2))
    noisy = np.clip(ramp + rng.normal(0, 0.03, TRAIN_EPOCHS), 0, 1)
    return [_record("train", e, e, float(m), n) for e, m in enumerate(noisy, start=1)]


def _pruned_records(
    dense: float, final: float, pruner: str, sparsity: float, n: int, rng: np.random.Generator
) -> list[dict]:
    records, g = [], 0
    noise = 0.08 if pruner == "mp" else 0.01
    every = PRUNE_EPOCHS // STEPS
    for stage, epochs in (("prune", PRUNE_EPOCHS), ("finetune", FINETUNE_EPOCHS)):
        for e in range(1, epochs + 1):
            g += 1
            frac = min(g / PRUNE_EPOCHS, 1.0)
            target = sparsity * frac
            updated = stage == "prune" and (pruner == "mp" or (e - 1) % every == 0)
            miou = float(np.clip(dense + (final - dense) * frac + rng.normal(0, noise), 0, 1))
            extra = {
                "target_sparsity": target,
                "achieved_sparsity": target,
                "overall_sparsity": target * 0.99,
                "nonzero_params": round(1000 * (1 - target)),
                "mask_updated": updated,
            }
            records.append(_record(stage, e, g, miou, n, **extra))
    return records


def _examples(dataset: str, miou: float, n: int) -> dict[str, np.ndarray]:
    """The same K test images for every trial of a dataset; worse models flip more pixels."""
    rng = np.random.default_rng(len(dataset))
    image = rng.integers(0, 256, (K, SIZE, SIZE, 3), dtype=np.uint8)
    gt = (np.add.outer(np.arange(SIZE), np.arange(SIZE)) * n // (2 * SIZE)).astype(np.uint8)
    gt = np.repeat(gt[None], K, axis=0)
    gt[:, :, -2:] = 255
    flip = np.random.default_rng(int(miou * 1000)).random(gt.shape) > miou
    pred = np.where(flip, (gt + 1) % n, gt).astype(np.uint8)
    pred[gt == 255] = 255
    return {"image": image, "gt": gt, "pred": pred}


def _config(
    dataset: str, model: str, pruner: str, sparsity: float, granularity: str | None = None
) -> dict:
    config = {
        "seed": 0,
        "data": {"dataset": dataset, "root": None, "crop_size": 16},
        "model": {"arch": model, "encoder": "tu-test_resnet", "encoder_weights": None},
        "loss": {"alpha": 0.3, "beta": 0.7},
        "optim": {"batch_size": 4, "momentum": 0.5},
        "stages": {
            "train_epochs": TRAIN_EPOCHS,
            "prune_epochs": PRUNE_EPOCHS,
            "finetune_epochs": FINETUNE_EPOCHS,
        },
        "pruning": {
            "pruner": pruner,
            "sparsity": sparsity,
            "steps": STEPS,
            "mp_warmup_epochs": 1,
            "mp_cooldown_epochs": 1,
        },
        "runtime": {"device": "cpu"},
    }
    if granularity:
        config["pruning"]["granularity"] = granularity
    return config


def inference(model: str, pruner: str, sparsity: float, granularity: str) -> dict:
    """final.json's `inference` block: element pruning shrinks the compact file, channel pruning
    also the parameters, MACs and latency."""
    keep = 1 - sparsity if pruner != "none" else 1.0
    channel = granularity == "channel"
    compact = DENSE_MIB[model] * (keep if channel else min(1.0, keep * 1.1 + 0.02))
    return {
        "params": round(1000 * keep) if channel else 1000,
        "nonzero_params": round(1000 * keep),
        "gmacs": 2.0 * (keep if channel else 1.0),
        "size": [64, 64],
        "dense_fp32_mib": DENSE_MIB[model] * (keep if channel else 1.0),
        "compact_mib": compact,
        "compact_fp16_mib": compact / 2,
        "latency_ms": DENSE_MS[model] * (keep + 0.1 if channel else 1.0),
        "latency_device": "cpu",
        "threads": 4,
    }


def _scores(miou: float, n: int) -> dict:
    iou = _ious(miou, n)
    return {
        "test_loss": 1 - miou,
        "test_miou": miou,
        "test_miou_corrosion": float(np.mean(iou[1:])),
        "test_iou": iou,
    }


def _write_trial(
    trials: Path, name: str, dataset: str, model: str, pruner: str, s: float, granularity: str
) -> None:
    out = trials / name
    (out / "checkpoints").mkdir(parents=True)
    n = len(CLASSES[dataset])
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    dense = DENSE_MIOU[model] - (0.05 if dataset == "nea" else 0.0)
    pruned = pruner != "none"
    drop = CHANNEL_DROP[s] if granularity == "channel" else DROP[pruner][s] if pruned else 0.0
    final_miou = dense * (1 - drop * MODEL_DROP_FACTOR[model])
    old = dataset == "nea"  # written as by a run from before channel pruning
    config = _config(dataset, model, pruner, s, None if old else granularity)
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    env = {"seed": 0, "versions": {"python": "3.11"}, "hostname": "vm", "device": "cpu"}
    _dump(
        out / "env.json", {**env, "started_at": "2026-01-01T00:00:00+00:00", "node_ip": "10.0.0.1"}
    )
    records = (
        _pruned_records(dense, final_miou, pruner, s, n, rng)
        if pruned
        else _dense_records(dense, n, rng)
    )
    if name == RUNNING:
        lines = [json.dumps(r) for r in records[:3]] + [json.dumps(records[3])[:40]]
        (out / "metrics.jsonl").write_text("\n".join(lines))
        return
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if name == ERRORED:
        (out / "error.txt").write_text("RuntimeError: CUDA out of memory\n\nTraceback ...\n")
        return
    np.savez_compressed(out / "examples.npz", **_examples(dataset, final_miou, n))
    final = {
        "class_names": CLASSES[dataset],
        "dense": _scores(dense, n),
        "pruned": _scores(final_miou, n) if pruned else None,
        "achieved_sparsity": s,
        "overall_sparsity": s * 0.99,
        "nonzero_params": round(1000 * (1 - s)),
        "total_params": 1000,
        "wall_time_s": 12.5,
    }
    if not old:
        final["inference"] = inference(model, pruner, s, granularity)
        if name == NO_LATENCY:
            final["inference"]["latency_ms"] = None
    _dump(out / "final.json", final)


def write_fake_run(
    root: Path,
    datasets: tuple[str, ...] = ("synthetic", "nea"),
    models: tuple[str, ...] = ("fpn", "linknet", "unet"),
    pruners: tuple[str, ...] = ("lp", "agp", "mp"),
    sparsities: tuple[float, ...] = (0.2, 0.5, 0.9),
) -> Path:
    """A run with dense and pruned trials; one errored, one running, one not started; and the
    CHANNEL_TRIALS of its datasets, models and sparsities (outside the sweep file's grid)."""
    root.mkdir(parents=True, exist_ok=True)
    sweep = {
        "preset": "fake",
        "sweep": {
            "datasets": list(datasets),
            "models": list(models),
            "pruners": list(pruners),
            "sparsities": list(sparsities),
        },
        "trial": _config(datasets[0], models[0], "none", 0.0),
    }
    (root / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    trials = root / "trials"
    for dataset in datasets:
        for model in models:
            _write_trial(trials, f"{dataset}-{model}-dense", dataset, model, "none", 0.0, "element")
            for pruner in pruners:
                for s in sparsities:
                    name = f"{dataset}-{model}-{pruner}-s{s:g}"
                    if name != NOT_STARTED:
                        _write_trial(trials, name, dataset, model, pruner, s, "element")
                    channel = f"{dataset}-{model}-{pruner}-channel-s{s:g}"
                    if channel in CHANNEL_TRIALS:
                        _write_trial(trials, channel, dataset, model, pruner, s, "channel")
    return root


def seeded(run: Run, spread: float = 0.0005, seeds: int = 3) -> Run:
    """The one-seed fake run repeated over `seeds` seeds: pruned mIoU shifted by -spread, 0,
    +spread, ... (the mean stays the single run's), epoch-to-epoch curves scaled a little."""
    offsets = np.linspace(-spread, spread, seeds)
    results, curves = [], []
    for seed, offset in enumerate(offsets):
        part = run.results.assign(seed=seed, trial=run.results["trial"] + f"-seed{seed}")
        pruned = part["pruner"] != "none"
        part.loc[pruned, "pruned_test_miou"] += offset
        part.loc[pruned, "test_miou"] = part.loc[pruned, "pruned_test_miou"]
        part["iou_drop"] = part["dense_test_miou"] - part["pruned_test_miou"]
        part["iou_drop_rel"] = part["iou_drop"] / part["dense_test_miou"]
        results.append(part)
        c = run.curves.assign(seed=seed, trial=run.curves["trial"] + f"-seed{seed}")
        c["val_miou"] = c["val_miou"] * (1 + 0.01 * seed)
        curves.append(c)
    return replace(run, results=pd.concat(results), curves=pd.concat(curves))


INT8_REFUSED = "synthetic-linknet-agp-s0.5"  # its INT8 export refused by the agreement floor


def write_int8_records(run_dir: Path, models: tuple[str, ...] = ("fpn", "linknet")) -> list[str]:
    """deploy/int8.json, as the sweep's `deploy_int8` writes it, for the finished synthetic
    trials of `models` (element and channel ones); INT8_REFUSED is refused. Returns the trials:
    INT8 runs 2x faster than fp32 ONNX Runtime, which runs 0.8x torch's time, and loses 0.004
    mIoU."""
    from sweep.deploy_step import FORMAT, record_path

    written = []
    prefixes = tuple(f"synthetic-{m}-" for m in models)
    for trial in sorted((run_dir / "trials").iterdir()):
        final_path = trial / "final.json"
        if not trial.name.startswith(prefixes) or not final_path.exists():
            continue
        final = json.loads(final_path.read_text())
        block = final["pruned"] or final["dense"]
        record: dict = {"format": FORMAT, "runtime": "onnxruntime-int8", "cpu": "fake CPU"}
        if trial.name == INT8_REFUSED:
            record.update(status="refused", reason="INT8 model of m agrees with fp32 on only 60%")
        else:
            fp32_ms = 0.8 * final["inference"]["latency_ms"]
            record.update(
                status="exported",
                reason=None,
                test_miou=block["test_miou"] - 0.004,
                latency_ms=fp32_ms / 2,
                fp32_onnx_latency_ms=fp32_ms,
                agreement=0.99,
                file_mib=final["inference"]["compact_mib"] / 4,
            )
        record_path(trial).parent.mkdir(exist_ok=True)
        _dump(record_path(trial), record)
        written.append(trial.name)
    return written
