"""A fake but schema-true run directory, as the sweep writes it, for the analysis tests."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import yaml

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
MODEL_DROP_FACTOR = {"fpn": 1.0, "linknet": 1.1, "unet": 1.5}
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


def _config(dataset: str, model: str, pruner: str, sparsity: float) -> dict:
    return {
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


def _scores(miou: float, n: int) -> dict:
    iou = _ious(miou, n)
    return {
        "test_loss": 1 - miou,
        "test_miou": miou,
        "test_miou_corrosion": float(np.mean(iou[1:])),
        "test_iou": iou,
    }


def _write_trial(trials: Path, name: str, dataset: str, model: str, pruner: str, s: float) -> None:
    out = trials / name
    (out / "checkpoints").mkdir(parents=True)
    n = len(CLASSES[dataset])
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    dense = DENSE_MIOU[model] - (0.05 if dataset == "nea" else 0.0)
    pruned = pruner != "none"
    final_miou = dense * (1 - DROP[pruner][s] * MODEL_DROP_FACTOR[model]) if pruned else dense
    (out / "config.yaml").write_text(yaml.safe_dump(_config(dataset, model, pruner, s)))
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
    _dump(out / "final.json", final)


def write_fake_run(
    root: Path,
    datasets: tuple[str, ...] = ("synthetic", "nea"),
    models: tuple[str, ...] = ("fpn", "linknet", "unet"),
    pruners: tuple[str, ...] = ("lp", "agp", "mp"),
    sparsities: tuple[float, ...] = (0.2, 0.5, 0.9),
) -> Path:
    """A run with dense and pruned trials; one errored, one running, one not started."""
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
            _write_trial(trials, f"{dataset}-{model}-dense", dataset, model, "none", 0.0)
            for pruner in pruners:
                for s in sparsities:
                    name = f"{dataset}-{model}-{pruner}-s{s:g}"
                    if name != NOT_STARTED:
                        _write_trial(trials, name, dataset, model, pruner, s)
    return root
