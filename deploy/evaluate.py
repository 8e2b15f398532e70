"""Any artefact scored on a dataset split with the trials' own metric (one confusion matrix, mIoU
over the classes present in the split's ground truth)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from deploy.artefacts import Artefact
from trainables.config import DataConfig, TrialConfig
from trainables.data import build_datasets, decoded_root, split_items
from trainables.data.dataset import SegmentationDataset, eval_transform
from trainables.data.warp import IGNORE_INDEX
from trainables.engine import make_loader
from trainables.errors import UserError
from trainables.metrics import ConfusionMeter

SPLITS = ("test", "val")


def evaluation_data(artefact: Artefact, dataset: str | None, root: Path | None) -> DataConfig:
    """The data to score on: the artefact's stored dataset unless `dataset` names another (then
    with that dataset's own settings), at `root` if given. Its class count must be the model's."""
    stored = artefact.cfg.data if artefact.cfg is not None else None
    if stored is None and dataset is None:
        raise UserError(
            f"{artefact.path} carries no corroprune metadata (no trial config): give --dataset "
            "(and --data-root) to say what to score it on"
        )
    if stored is not None and dataset in (None, stored.dataset):
        data = stored
    else:
        fields: dict[str, Any] = {"dataset": dataset}
        if dataset == "folder":  # a folder set has no class count of its own
            fields["num_classes"] = artefact.num_classes
        data = TrialConfig.from_dict({"data": fields}).data
    if root is not None:
        data = dataclasses.replace(data, root=str(root.resolve()))
    if data.classes != artefact.num_classes:
        raise UserError(
            f"{artefact.path} predicts {artefact.num_classes} classes "
            f"({', '.join(artefact.class_names)}), but dataset '{data.dataset}' has {data.classes}"
        )
    return data


def split_dataset(data: DataConfig, split: str) -> SegmentationDataset:
    """The split's whole images, padded to a multiple of `data.eval_pad_to` (padding ignored),
    exactly as a trial evaluates them."""
    if split == "val":  # the validation part of the trial's seeded train/val split
        return build_datasets(data, seed=0).val
    items = split_items(data, split)
    if not items:
        raise UserError(f"no {split} images with masks found for dataset '{data.dataset}'")
    cache = decoded_root() if data.cache else None
    return SegmentationDataset(
        items, eval_transform(data), data.classes, cache=cache, resize=data.resize
    )


def evaluate(artefact: Artefact, data: DataConfig, split: str = "test") -> dict[str, Any]:
    """mIoU, corrosion mIoU and per-class IoU of `artefact` on the split (trainables.metrics),
    one image at a time."""
    if split not in SPLITS:
        raise UserError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    try:
        dataset = split_dataset(data, split)
    except UserError as err:
        raise UserError(
            f"{err} (--data-root DIR says where dataset '{data.dataset}' is on this machine)"
        ) from None
    meter = ConfusionMeter(artefact.num_classes, ignore_index=IGNORE_INDEX)
    for images, masks in make_loader(dataset, 1, train=False):  # (1, 3, H, W), (1, H, W)
        meter.update(torch.from_numpy(artefact(images)), masks)
    return {
        "artefact": str(artefact.path),
        "kind": artefact.kind,
        "runtime": artefact.runtime,
        "dataset": data.dataset,
        "data_root": data.root,
        "split": split,
        "images": len(dataset),
        "class_names": list(artefact.class_names),
        **meter.compute(),
    }


def summary(result: dict[str, Any]) -> str:
    """mIoU and per-class IoU as the CLI prints them."""
    names = result["class_names"]
    present = set(result["miou_classes"])
    lines = [
        f"{result['artefact']} ({result['runtime']}) on {result['dataset']} {result['split']} "
        f"({result['images']} images)",
        f"mIoU {result['miou']:.4f}, corrosion classes {result['miou_corrosion']:.4f}; predicting "
        f"all background would score {result['all_background_miou']:.4f}",
    ]
    for c, (name, iou) in enumerate(zip(names, result["iou"], strict=True)):
        note = "" if c in present else "  (absent from the ground truth: not in the mean)"
        lines.append(f"  {name:<12} IoU {iou:.4f}{note}")
    return "\n".join(lines)
