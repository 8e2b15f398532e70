"""Augmentations and the torch Datasets: aligned masks, ImageNet normalisation, ignored padding.

Images come decoded and resized (`data.resize`) from the disk cache (`cache.py`). Training
augmentation runs either here, per image in the DataLoader workers (`SegmentationDataset` with
`train_transform`, albumentations), or on the training device (`WarpDataset`: uint8 images plus
one matrix each, warped a batch at a time by `warp.warp_batch`); `runtime.augment` chooses.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import Dataset, Sampler, get_worker_info

from trainables.config import DataConfig
from trainables.data import warp
from trainables.data.cache import cached, decode
from trainables.data.formats import Item
from trainables.data.warp import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD


def map_budget() -> int:
    """How many items one dataset keeps memory-mapped: two file descriptors each, and a process
    holds train, val and test datasets, so an eighth of the open-file limit apiece."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # no such limit here
        return 128
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(16, soft // 8)


def train_transform(cfg: DataConfig) -> A.Compose:
    """Affine (scale, rotation, shift), flips, 90-degree turns, random crop; masks nearest.
    The parameters are `warp`'s, so both places of augmentation draw from one distribution."""
    size = cfg.crop_size
    return A.Compose(
        [
            A.Affine(
                scale=warp.SCALE,
                rotate=warp.ROTATE,
                translate_percent=warp.TRANSLATE,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=IGNORE_INDEX,
                p=warp.AFFINE_P,
            ),
            A.HorizontalFlip(p=warp.FLIP_P),
            A.VerticalFlip(p=warp.FLIP_P),
            A.RandomRotate90(p=warp.ROT90_P),
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
    """Items -> (image (3, H, W) float, mask (H, W) long); augmentation seeded per (epoch, index).

    `cache`: the decoded-image folder (`cache.py`), or None to decode on every access.
    `resize`: the longer side, applied once at decoding (`data.resize`).
    """

    def __init__(
        self,
        items: list[Item],
        transform: A.Compose | None,
        num_classes: int,
        *,
        seed: int = 0,
        cache: Path | None = None,
        resize: int | None = None,
    ) -> None:
        self.items = items
        self.transform = transform
        self.num_classes = num_classes
        self.seed = seed
        self.epoch = 0
        self.cache_dir = cache
        self.resize = resize
        # Memory maps of the cached arrays, most recently used last. Each map holds a file
        # descriptor open, so at most `max_maps` items stay mapped; older ones are mapped again
        # when next read (about 0.1 ms each).
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.max_maps = map_budget()

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image (H, W, 3) uint8, mask (H, W) uint8), decoded and resized (read-only when
        memory-mapped from the cache)."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        item = self.items[index]
        if self.cache_dir is None:
            return decode(item, self.num_classes, self.resize)
        pair = cached(item, self.num_classes, self.resize, self.cache_dir)
        self._cache[index] = pair
        while len(self._cache) > self.max_maps:
            self._cache.popitem(last=False)
        return pair

    def item_seed(self, epoch: int, index: int) -> int:
        return (self.seed * 1_000_003 + epoch * 100_003 + index) % 2**32

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """`index`, or `(epoch, index)` from `EpochSampler` (persistent workers never see
        `set_epoch`, so the epoch travels with the index)."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        image, mask = self.raw(index)
        seed = self.item_seed(epoch, index)
        # One generator shared by the whole pipeline, drawn in order: `set_random_seed` would
        # give every transform the same seed, so all of them would fire (or not) together.
        self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out = self.transform(image=image, mask=mask)
        return out["image"], out["mask"].long()


class WarpDataset(SegmentationDataset):
    """Training items for augmentation on the device: arrays (image (H, W, 3) uint8, mask (H, W)
    uint8, theta (2, 3) float32), theta from `warp.sample_transform` seeded per (epoch, index) as in
    `SegmentationDataset`. Batch with `WarpCollate`, then `WarpBatch.warp` on the device."""

    def __init__(self, items: list[Item], num_classes: int, *, crop: int, **kwargs: object) -> None:
        super().__init__(items, None, num_classes, **kwargs)  # type: ignore[arg-type]
        self.crop = crop

    def __getitem__(  # type: ignore[override]
        self, key: int | tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        image, mask = self.raw(index)  # possibly read-only maps: `WarpCollate` copies them once
        rng = np.random.default_rng(self.item_seed(epoch, index))
        theta = warp.sample_transform(rng, image.shape[0], image.shape[1], self.crop)
        return image, mask, theta


class WarpBatch(NamedTuple):
    """A training batch before augmentation: canvases padded at the bottom/right (images with 0,
    masks with IGNORE_INDEX), one output -> source matrix each, and the crop size."""

    images: torch.Tensor  # (N, H, W, 3) uint8
    masks: torch.Tensor  # (N, H, W) uint8
    theta: torch.Tensor  # (N, 2, 3) float32
    size: int

    def warp(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented, normalised (N, 3, size, size) float32 images and (N, size, size) int64
        masks on `device`."""
        return warp.warp_batch(
            self.images.to(device, non_blocking=True),
            self.masks.to(device, non_blocking=True),
            self.theta.to(device, non_blocking=True),
            self.size,
        )


def _fill(canvas: np.ndarray, i: int, array: np.ndarray, pad: int) -> None:
    """canvas[i] = array at the top left, `pad` elsewhere (written once: no zeroing pass)."""
    h, w = array.shape[:2]
    canvas[i, :h, :w] = array
    canvas[i, h:] = pad
    canvas[i, :h, w:] = pad


def _canvas(shape: tuple[int, ...], pin: bool) -> torch.Tensor:
    """An uninitialised uint8 tensor, page-locked if `pin` in the main process (the copy to the
    GPU is then asynchronous, and the loader's `pin_memory` finds nothing left to do). In a
    loader worker torch moves it to shared memory on the way to the main process; building it
    there directly measured no faster."""
    return torch.empty(shape, dtype=torch.uint8, pin_memory=pin and get_worker_info() is None)


class WarpCollate:
    """`collate_fn` for `WarpDataset`: copies each (memory-mapped) image once, into a canvas of
    the largest size in the batch (page-locked with `pin`, for a CUDA device)."""

    def __init__(self, crop: int, pin: bool = False) -> None:
        self.crop, self.pin = crop, pin

    def __call__(self, batch: Sequence[tuple[np.ndarray, ...]]) -> WarpBatch:
        n = len(batch)
        h = max(image.shape[0] for image, _, _ in batch)
        w = max(image.shape[1] for image, _, _ in batch)
        images, masks = _canvas((n, h, w, 3), self.pin), _canvas((n, h, w), self.pin)
        image_canvas, mask_canvas = images.numpy(), masks.numpy()
        for i, (image, mask, _) in enumerate(batch):
            _fill(image_canvas, i, image, 0)
            _fill(mask_canvas, i, mask, IGNORE_INDEX)
        theta = torch.from_numpy(np.stack([t for _, _, t in batch]))
        return WarpBatch(images, masks, theta, self.crop)


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
