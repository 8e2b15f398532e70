"""One epoch of training or evaluation, the paper's optimiser and loss; no files, no Ray."""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from segmentation_models_pytorch.losses import TverskyLoss
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from trainables.config import LossConfig, OptimConfig, RuntimeConfig
from trainables.data.dataset import EpochSampler, WarpBatch, WarpCollate, WarpDataset
from trainables.data.warp import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from trainables.errors import UserError
from trainables.metrics import ConfusionMeter


class SegmentationLoss(nn.Module):
    """Tversky loss on logits (alpha weights false positives, beta false negatives), plus an
    optional cross-entropy term; ignored pixels count in neither."""

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        weights = list(cfg.class_weights) if cfg.class_weights else None
        self.tversky = TverskyLoss(
            mode="multiclass",
            alpha=cfg.alpha,
            beta=cfg.beta,
            ignore_index=IGNORE_INDEX,
            class_weights=weights,
        )
        self.ce_weight = cfg.ce_weight
        ce_weights = torch.tensor(weights, dtype=torch.float) if weights else None
        self.ce = nn.CrossEntropyLoss(weight=ce_weights, ignore_index=IGNORE_INDEX)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.tversky(logits, target)  # logits (N, C, H, W), target (N, H, W)
        if self.ce_weight:
            loss = loss + self.ce_weight * self.ce(logits, target)
        return loss


def build_loss(cfg: LossConfig) -> nn.Module:
    return SegmentationLoss(cfg)


def build_optimizer(
    model: nn.Module, cfg: OptimConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.CyclicLR]:
    """SGD with fixed momentum and a triangular cyclical LR stepped every iteration."""
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CyclicLR(
        optimizer,
        base_lr=cfg.base_lr,
        max_lr=cfg.max_lr,
        step_size_up=cfg.half_cycle_iters,
        mode="triangular",
        cycle_momentum=False,  # the paper's momentum is a constant 0.5
    )
    return optimizer, scheduler


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("runtime.device is 'cuda' but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pad_collate(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack images of different sizes by padding to the largest (mask padding is ignored)."""
    h = max(img.shape[-2] for img, _ in batch)
    w = max(img.shape[-1] for img, _ in batch)
    images = torch.zeros(len(batch), batch[0][0].shape[0], h, w, dtype=batch[0][0].dtype)
    masks = torch.full((len(batch), h, w), IGNORE_INDEX, dtype=torch.long)
    for i, (img, mask) in enumerate(batch):
        images[i, :, : img.shape[-2], : img.shape[-1]] = img
        masks[i, : mask.shape[-2], : mask.shape[-1]] = mask
    return images, masks  # (N, 3, H, W), (N, H, W)


def make_loader(
    dataset: Dataset, batch_size: int, *, train: bool, num_workers: int = 0, seed: int = 0
) -> DataLoader:
    """Training loaders shuffle with `EpochSampler(seed)`: call `loader.sampler.set_epoch(e)`
    before each epoch. Workers persist across epochs, keeping their maps of the decoded images
    (torch gives each worker one thread; OpenCV's pool is left alone: resizing it in a forked
    worker deadlocks). A `WarpDataset` gives `WarpBatch`es: pass them through `to_device`."""
    warped = isinstance(dataset, WarpDataset)
    pin = torch.cuda.is_available()
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), seed) if train else None,
        drop_last=train and len(dataset) > batch_size,  # a batch of 1 breaks BatchNorm
        num_workers=num_workers,
        collate_fn=WarpCollate(dataset.crop, pin) if warped else pad_collate,
        persistent_workers=num_workers > 0,
        pin_memory=pin,
    )


def to_device(
    batch: WarpBatch | tuple[torch.Tensor, torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 3, H, W) float32, masks (N, H, W) int64) on `device`; a `WarpBatch` is
    augmented there."""
    if isinstance(batch, WarpBatch):
        return batch.warp(device)
    images, masks = batch
    return images.to(device, non_blocking=True), masks.to(device, non_blocking=True)


@dataclass
class StepHooks:
    """What pruning adds around an optimizer step (all optional)."""

    after_backward: Any = None  # () -> None
    before_step: Any = None  # () -> None
    after_step: Any = None  # (optimizer) -> None


def _progress(loader: DataLoader, desc: str, runtime: RuntimeConfig) -> Any:
    show = runtime.progress and sys.stderr.isatty()
    return tqdm(loader, desc=desc, leave=False, disable=not show, dynamic_ncols=True)


def forward(model: nn.Module, images: torch.Tensor, runtime: RuntimeConfig) -> torch.Tensor:
    """Logits in float32, computed under bf16 autocast and/or channels-last when configured
    (`runtime` resolved: "auto" counts as off here)."""
    if runtime.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bool(runtime.amp)):
        logits = model(images)  # (N, C, H, W)
    return logits.float()


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    *,
    hooks: StepHooks | None = None,
    runtime: RuntimeConfig | None = None,
    desc: str = "train",
) -> float:
    """Mean training loss over the epoch; synchronises with the device once, at the end."""
    hooks = hooks or StepHooks()
    runtime = (runtime or RuntimeConfig()).resolve(device.type)
    model.train()
    total = torch.zeros((), device=device)
    seen = 0
    for batch in _progress(loader, desc, runtime):
        images, masks = to_device(batch, device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(forward(model, images, runtime), masks)  # masks (N, H, W)
        loss.backward()
        if hooks.after_backward:
            hooks.after_backward()
        if hooks.before_step:
            hooks.before_step()
        optimizer.step()
        if hooks.after_step:
            hooks.after_step(optimizer)
        scheduler.step()
        total += loss.detach() * images.shape[0]
        seen += images.shape[0]
    return (total / max(seen, 1)).item()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: nn.Module,
    num_classes: int,
    device: torch.device,
    runtime: RuntimeConfig | None = None,
    desc: str = "eval",
) -> dict[str, Any]:
    """Loss and dataset-level IoU (one confusion matrix over the whole split)."""
    runtime = (runtime or RuntimeConfig()).resolve(device.type)
    model.eval()
    meter = ConfusionMeter(num_classes, device, IGNORE_INDEX)
    total = torch.zeros((), device=device)
    seen = 0
    for images, masks in _progress(loader, desc, runtime):
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        logits = forward(model, images, runtime)
        total += loss_fn(logits, masks) * images.shape[0]
        seen += images.shape[0]
        meter.update(logits, masks)
    return {"loss": (total / max(seen, 1)).item(), **meter.compute()}


@torch.no_grad()
def predict_examples(
    model: nn.Module, dataset: Dataset, count: int, device: torch.device
) -> dict[str, np.ndarray]:
    """The first `count` items: de-normalised image (K,H,W,3) uint8, truth and prediction (K,H,W)."""
    model.eval()
    items = [dataset[i] for i in range(min(count, len(dataset)))]
    if not items:
        return {}
    images, masks = pad_collate(items)
    preds = torch.cat(
        [model(images[i : i + 1].to(device)).argmax(1).cpu() for i in range(len(items))]
    )
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = ((images * std + mean).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1)
    preds[masks == IGNORE_INDEX] = IGNORE_INDEX
    return {"image": rgb.numpy(), "gt": masks.byte().numpy(), "pred": preds.byte().numpy()}
