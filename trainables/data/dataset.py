"""Augmentations and the torch Dataset: aligned masks, ImageNet normalisation, ignored padding."""

from __future__ import annotations

import random
from collections.abc import Iterator

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import Dataset, Sampler

from trainables.config import DataConfig
from trainables.data.formats import Item, load_item

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _resize(cfg: DataConfig) -> list[A.BasicTransform]:
    if cfg.resize is None:
        return []
    return [
        A.LongestMaxSize(
            max_size=cfg.resize, interpolation=cv2.INTER_AREA, mask_interpolation=cv2.INTER_NEAREST
        )
    ]


def train_transform(cfg: DataConfig) -> A.Compose:
    """Affine (scale, rotation, shift), flips, 90-degree turns, random crop; masks nearest."""
    size = cfg.crop_size
    return A.Compose(
        [
            *_resize(cfg),
            A.Affine(
                scale=(0.75, 1.25),
                rotate=(-30, 30),
                translate_percent=(-0.1, 0.1),
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=IGNORE_INDEX,
                p=0.8,
            ),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            A.PadIfNeeded(
                min_height=size,
                min_width=size,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=IGNORE_INDEX,
            ),
            A.RandomCrop(height=size, width=size),
            A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
            ToTensorV2(),
        ],
        strict=True,
    )


def eval_transform(cfg: DataConfig) -> A.Compose:
    """Whole image, padded at the bottom/right to a multiple of 32 (padding ignored)."""
    return A.Compose(
        [
            *_resize(cfg),
            A.PadIfNeeded(
                min_height=None,
                min_width=None,
                pad_height_divisor=cfg.eval_pad_to,
                pad_width_divisor=cfg.eval_pad_to,
                position="top_left",
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=IGNORE_INDEX,
            ),
            A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
            ToTensorV2(),
        ],
        strict=True,
    )


def epoch_seed(seed: int, global_epoch: int) -> int:
    """A seed per (run seed, epoch): a resumed run draws exactly what the uninterrupted one did."""
    return (seed * 1_000_003 + global_epoch * 7919) % 2**31


class SegmentationDataset(Dataset):
    """Items -> (image (3, H, W) float, mask (H, W) long); augmentation seeded per (epoch, index)."""

    def __init__(
        self,
        items: list[Item],
        transform: A.Compose,
        num_classes: int,
        *,
        seed: int = 0,
        cache: bool = True,
    ) -> None:
        self.items = items
        self.transform = transform
        self.num_classes = num_classes
        self.seed = seed
        self.epoch = 0
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        pair = load_item(self.items[index], self.num_classes)
        if self._cache is not None:
            self._cache[index] = pair
        return pair

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """`index`, or `(epoch, index)` from `EpochSampler` (persistent workers never see
        `set_epoch`, so the epoch travels with the index)."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        image, mask = self.raw(index)
        seed = (self.seed * 1_000_003 + epoch * 100_003 + index) % 2**32
        # One generator shared by the whole pipeline, drawn in order: `set_random_seed` would
        # give every transform the same seed, so all of them would fire (or not) together.
        self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out = self.transform(image=image, mask=mask)
        return out["image"], out["mask"].long()


class EpochSampler(Sampler[tuple[int, int]]):
    """A shuffle per epoch that depends only on (seed, epoch), yielding `(epoch, index)`:
    exact on resume, and usable with persistent workers (`set_epoch` runs in the main process)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(self.size, generator=generator)
        return ((self.epoch, int(i)) for i in order)
