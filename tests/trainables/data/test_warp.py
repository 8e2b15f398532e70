"""Augmentation on the device: the warp against OpenCV and numpy, the parameter distribution,
mask alignment, determinism, and the loader's uint8 batches."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from albumentations.augmentations.geometric import functional as fgeometric

from trainables.config import DataConfig, SynthConfig
from trainables.data import build_datasets, warp
from trainables.data.dataset import (
    IGNORE_INDEX,
    SegmentationDataset,
    WarpBatch,
    WarpCollate,
    WarpDataset,
    eval_transform,
)
from trainables.data.formats import Item
from trainables.data.synth import generate_sample
from trainables.engine import make_loader, to_device

MEAN = np.array(warp.IMAGENET_MEAN) * 255
STD = np.array(warp.IMAGENET_STD) * 255


def _image(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth RGB image (H, W, 3) and a blocky 4-class mask (H, W), both uint8."""
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (7, 7), 2)
    mask = rng.integers(0, 4, (h // 10 + 1, w // 10 + 1), dtype=np.uint8)
    return image, np.kron(mask, np.ones((10, 10), np.uint8))[:h, :w]


def _warp(
    image: np.ndarray, mask: np.ndarray, forward: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """`warp_batch` of one image with a source -> output matrix; de-normalised to 0-255."""
    theta = torch.tensor(np.linalg.inv(forward)[:2], dtype=torch.float32)[None]
    images, masks = warp.warp_batch(
        torch.from_numpy(image)[None], torch.from_numpy(mask)[None], theta, size
    )
    return images[0].permute(1, 2, 0).numpy() * STD + MEAN, masks[0].numpy()


def test_affine_matrix_is_albumentations_own() -> None:
    h, w = 60, 80
    ours = warp.affine_matrix((1.1, 0.9), 17.0, (5, -3), h, w)
    theirs = fgeometric.create_affine_transformation_matrix(
        {"x": 5, "y": -3},
        {"x": 0.0, "y": 0.0},
        {"x": 1.1, "y": 0.9},
        17.0,
        fgeometric.center((h, w)),
    )
    assert np.allclose(ours, theirs)


def test_warp_matches_opencv_for_an_affine() -> None:
    h, w = 60, 80
    image, mask = _image(h, w)
    forward = warp.affine_matrix((1.2, 0.8), -25.0, (6, 4), h, w)
    pixels, labels = _warp(image, mask, forward, 80)
    ref = cv2.warpAffine(image, forward[:2], (80, 80), flags=cv2.INTER_LINEAR, borderValue=0)
    ref_mask = cv2.warpAffine(
        mask, forward[:2], (80, 80), flags=cv2.INTER_NEAREST, borderValue=IGNORE_INDEX
    )
    assert np.abs(pixels - ref).max() <= 0.51  # OpenCV rounds to uint8
    assert (labels == ref_mask).mean() > 0.999
    assert 0.05 < (labels == IGNORE_INDEX).mean() < 0.5  # outside the source: ignored


@pytest.mark.parametrize("turns", [0, 1, 2, 3])
def test_flips_turns_and_crops_are_exact(turns: int) -> None:
    h, w = 50, 70
    image, mask = _image(h, w, seed=turns)
    hflip = np.array([[-1.0, 0.0, w - 1], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    turn, th, tw = warp.rot90_matrix(turns, h, w)
    forward = np.array([[1.0, 0, -3], [0, 1, -7], [0, 0, 1]]) @ turn @ hflip  # crop at (3, 7)
    pixels, labels = _warp(image, mask, forward, 40)
    ref = np.rot90(image[:, ::-1], turns)[7:47, 3:43]
    assert (th, tw) == np.rot90(image, turns).shape[:2]
    assert np.abs(pixels - ref).max() < 1e-2
    assert np.array_equal(labels, np.rot90(mask[:, ::-1], turns)[7:47, 3:43])


def test_small_images_are_padded_around_the_centre_and_ignored() -> None:
    image, mask = _image(20, 30)
    theta = warp.sample_transform(np.random.default_rng(0), 20, 30, 64)
    images, masks = WarpCollate(64)([(image, mask, theta)]).warp(torch.device("cpu"))
    assert images.shape == (1, 3, 64, 64) and masks.shape == (1, 64, 64)
    labelled = (masks != IGNORE_INDEX).sum().item()
    assert 0.5 * 600 < labelled < 1.6 * 600  # the image's 600 pixels, scaled by 0.75-1.25 twice
    black = torch.tensor(-MEAN / STD, dtype=torch.float32)  # as albumentations pads and fills
    outside = images.permute(0, 2, 3, 1)[masks == IGNORE_INDEX]  # (K, 3)
    assert torch.allclose(outside.median(0).values, black) and torch.allclose(
        images[0, :, 0, 0], black
    )


def test_parameters_follow_the_albumentations_distribution() -> None:
    """Affine 80 %, each flip 50 %, a turn 50 % (then 0-3 quarters): the matrices tell."""
    rng = np.random.default_rng(1)
    thetas = [np.vstack([warp.sample_transform(rng, 64, 64, 64), [0, 0, 1]]) for _ in range(4000)]
    linear = np.array([np.linalg.inv(t)[:2, :2] for t in thetas])  # source -> output, no shift
    axis_aligned = np.all(np.isclose(np.abs(linear), np.round(np.abs(linear))), (1, 2))
    assert abs(axis_aligned.mean() - 0.2) < 0.03
    plain = [m for m, a in zip(linear, axis_aligned, strict=True) if a]
    identity = np.mean([np.allclose(m, np.eye(2)) for m in plain])
    # no flip, no turn: 0.25 * (0.5 + 0.5/4) + the two flips cancelling a half turn: 0.25 * 0.125
    assert abs(identity - (0.25 * 0.625 + 0.25 * 0.125)) < 0.05
    scales = np.sqrt(np.abs(np.linalg.det(linear[~axis_aligned])))
    assert scales.min() > 0.74 and scales.max() < 1.26


def test_warped_masks_stay_aligned_with_the_image() -> None:
    palette = np.array([[0, 0, 250], [250, 0, 0], [0, 250, 0], [250, 250, 0]], np.uint8)
    index = np.kron(
        np.random.default_rng(0).integers(0, 4, (8, 8), dtype=np.uint8), np.ones((8, 8), np.uint8)
    )
    dataset = WarpDataset([Item(Path("x"), Path("y"))], 4, crop=32)
    dataset._cache.update({0: (palette[index], index)})
    collate = WarpCollate(32)
    for epoch in range(8):
        images, masks = collate([dataset[(epoch, 0)]]).warp(torch.device("cpu"))
        rgb, mask = images[0].permute(1, 2, 0).numpy() * STD + MEAN, masks[0].numpy()
        keep = mask != IGNORE_INDEX
        colour_class = np.argmin(((rgb[..., None, :] - palette[None, None]) ** 2).sum(-1), -1)
        interior = keep & (np.abs(rgb - palette[colour_class]).max(-1) < 40)
        assert interior.sum() > 0.5 * keep.sum()
        assert (colour_class[interior] == mask[interior]).all()


def test_warp_dataset_is_deterministic_per_epoch_and_index() -> None:
    image, mask = generate_sample(np.random.default_rng(0), 64, 4)
    dataset = WarpDataset([Item(Path("x"), Path("y"))], 4, crop=32, seed=3)
    dataset._cache.update({0: (image, mask)})
    a, b, c = dataset[(1, 0)][2], dataset[(1, 0)][2], dataset[(2, 0)][2]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_device_loader_matches_worker_counts_and_the_eval_image(tmp_path: Path) -> None:
    """uint8 batches from 0 and 2 workers warp to the same tensors; an identity matrix gives
    exactly what the evaluation transform gives."""
    synthetic = SynthConfig(train=10, test=1, size=64, classes=4, seed=0)
    cfg = DataConfig(root=str(tmp_path / "synthetic"), crop_size=64, synthetic=synthetic)
    data = build_datasets(cfg, 0, augment="device")
    assert isinstance(data.train, WarpDataset)
    batches = []
    for workers in (0, 2):
        loader = make_loader(data.train, 4, train=True, num_workers=workers, seed=0)
        loader.sampler.set_epoch(1)
        batch = next(iter(loader))
        assert isinstance(batch, WarpBatch) and batch.images.dtype == torch.uint8
        assert batch.images.shape == (4, 64, 64, 3) and batch.theta.shape == (4, 2, 3)
        batches.append(to_device(batch, torch.device("cpu")))
    assert all(torch.equal(x, y) for x, y in zip(*batches, strict=True))
    image, mask = data.train.raw(0)
    identity = np.array([[1, 0, 0], [0, 1, 0]], np.float32)
    warped, labels = WarpCollate(64)([(image, mask, identity)]).warp(torch.device("cpu"))
    plain = SegmentationDataset(data.train.items[:1], eval_transform(cfg), 4)
    ref_image, ref_mask = plain[0]
    assert torch.allclose(warped[0], ref_image, atol=1e-4) and torch.equal(labels[0], ref_mask)


def test_collate_pads_a_mixed_batch_black_and_ignored() -> None:
    """Canvases start uninitialised: every pixel beside a smaller image must still be written."""
    (big, big_mask), (small, small_mask) = _image(40, 50, 1), _image(30, 20, 2)
    identity = np.array([[1, 0, 0], [0, 1, 0]], np.float32)
    batch = WarpCollate(32)([(big, big_mask, identity), (small, small_mask, identity)])
    assert batch.images.shape == (2, 40, 50, 3) and batch.masks.shape == (2, 40, 50)
    assert np.array_equal(batch.images[1, :30, :20].numpy(), small)
    assert np.array_equal(batch.masks[1, :30, :20].numpy(), small_mask)
    assert (batch.images[1, 30:] == 0).all() and (batch.images[1, :30, 20:] == 0).all()
    assert (batch.masks[1, 30:] == IGNORE_INDEX).all()
    assert (batch.masks[1, :30, 20:] == IGNORE_INDEX).all()
    assert np.array_equal(batch.images[0].numpy(), big)
