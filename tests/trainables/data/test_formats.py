"""Loaders on small fixtures in the real formats, the real NEA frames, augmentation alignment."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import NEA_SAMPLE
from trainables.config import DataConfig, SynthConfig
from trainables.data import build_datasets, split_items
from trainables.data.check import check_dataset, class_distribution
from trainables.data.dataset import (
    IGNORE_INDEX,
    EpochSampler,
    SegmentationDataset,
    eval_transform,
    train_transform,
)
from trainables.data.formats import SSCS_COLOURS, SSCS_FOLDER, Item, rasterise
from trainables.data.synth import generate_sample, write_synthetic
from trainables.errors import UserError

RGB = {v: k for k, v in SSCS_COLOURS.items()}


def _mask(size: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4, (size, size), dtype=np.uint8)


def _save_mask(index: np.ndarray, path: Path, kind: str) -> None:
    if kind == "rgb":
        Image.fromarray(np.array([RGB[i] for i in range(4)], np.uint8)[index]).save(path)
    else:
        img = Image.fromarray(index, mode="P")
        img.putpalette([c for i in range(4) for c in RGB[i]] + [0] * (256 - 4) * 3)
        img.save(path)


def make_sscs(root: Path, variant: str, kind: str, n: int = 5) -> dict[str, np.ndarray]:
    base = root / SSCS_FOLDER / variant
    names = ("images_512", "mask_512") if variant == "512x512" else ("images", "masks")
    truth = {}
    for split in ("Train", "Test"):
        (base / split / names[0]).mkdir(parents=True)
        (base / split / names[1]).mkdir(parents=True)
        for i in range(n):
            index = _mask(32, seed=i)
            Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(
                base / split / names[0] / f"{i}.jpeg"
            )
            _save_mask(index, base / split / names[1] / f"{i}.png", kind)
            truth[f"{split}/{i}"] = index
    return truth


@pytest.mark.parametrize("variant", ["512x512", "original"])
@pytest.mark.parametrize("kind", ["rgb", "palette"])
def test_sscs_masks_read_as_indices(tmp_path: Path, variant: str, kind: str) -> None:
    truth = make_sscs(tmp_path, variant, kind)
    cfg = DataConfig(dataset="sscs", root=str(tmp_path), sscs_variant=variant, crop_size=32)
    ds = build_datasets(cfg, seed=0)
    assert len(ds.train) + len(ds.val) == 5 and len(ds.test) == 5
    assert ds.class_names == ("good", "fair", "poor", "severe")
    item = ds.test.items[0]
    mask = ds.test.raw(0)[1]
    assert np.array_equal(mask, truth[f"Test/{item.image.stem}"])
    assert check_dataset(tmp_path, "sscs", sscs_variant=variant) == []


def test_sscs_unknown_colour_is_named(tmp_path: Path) -> None:
    make_sscs(tmp_path, "512x512", "rgb", n=2)
    bad = tmp_path / SSCS_FOLDER / "512x512" / "Train" / "mask_512" / "1.png"
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[0, 0] = (10, 200, 10)
    Image.fromarray(arr).save(bad)
    problems = check_dataset(tmp_path, "sscs")
    assert [(p.path.name, "unknown mask colours" in p.reason) for p in problems] == [
        ("1.png", True)
    ]
    assert "(10, 200, 10)" in problems[0].reason


def make_nea(root: Path, frames: int = 20) -> None:
    entries = {}
    for i in range(1, frames + 1):
        name = f"{i}_{i * 7}.jpg"
        Image.fromarray(np.full((40, 64, 3), 120, np.uint8)).save(root / name)
        regions = [
            {
                "shape_attributes": {
                    "all_points_x": [0, 30, 30, 0],
                    "all_points_y": [0, 0, 20, 20],
                },
                "region_attributes": {"isCorroded": "corroded_c1"},
            },
            {
                "shape_attributes": {
                    "all_points_x": [20, 50, 50, 20],
                    "all_points_y": [10, 10, 30, 30],
                },
                "region_attributes": {"isCorroded": "corroded_c2"},
            },
        ]
        entries[f"{name}123"] = {"filename": name, "size": 123, "regions": regions}
    (root / "res.json").write_text(json.dumps(entries))


def test_nea_polygons_overlap_resolves_to_the_severe_class(tmp_path: Path) -> None:
    make_nea(tmp_path)
    cfg = DataConfig(dataset="nea", root=str(tmp_path), crop_size=32, nea_block_size=4)
    ds = build_datasets(cfg, seed=0)
    _, mask = ds.test.raw(0)
    assert mask[5, 5] == 1  # inside c1 only
    assert mask[15, 25] == 2  # inside both: c2 wins
    assert mask[35, 60] == 0
    assert ds.class_names == ("background", "corroded_c1", "corroded_c2")


def test_nea_split_keeps_frame_blocks_together(tmp_path: Path) -> None:
    make_nea(tmp_path, frames=40)
    cfg = DataConfig(
        dataset="nea",
        root=str(tmp_path),
        nea_block_size=5,
        nea_test_fraction=0.25,
        nea_guard_blocks=0,  # every frame in a split; the guard is tested in test_splits.py
    )
    train, test = split_items(cfg, "train"), split_items(cfg, "test")
    assert len(train) + len(test) == 40 and 0 < len(test) < 40
    assert {it.group for it in train}.isdisjoint({it.group for it in test})
    ds = build_datasets(cfg, seed=0)
    assert {it.group for it in ds.train.items}.isdisjoint({it.group for it in ds.val.items})


def test_nea_bad_label_is_reported(tmp_path: Path) -> None:
    make_nea(tmp_path, frames=2)
    data = json.loads((tmp_path / "res.json").read_text())
    first = next(iter(data.values()))
    first["regions"][0]["region_attributes"]["isCorroded"] = "rusty"
    (tmp_path / "res.json").write_text(json.dumps(data))
    problems = check_dataset(tmp_path, "nea")
    assert len(problems) == 1 and "'rusty'" in problems[0].reason


@pytest.mark.skipif(not NEA_SAMPLE.is_dir(), reason="real NEA frames not present")
def test_real_nea_frames_pad_to_a_multiple_of_32() -> None:
    frame = sorted(NEA_SAMPLE.glob("*.jpg"))[0]
    polygons = ((1, ((100.0, 100.0), (400.0, 100.0), (400.0, 300.0))),)
    ds = SegmentationDataset([Item(frame, polygons=polygons)], eval_transform(DataConfig()), 3)
    image, mask = ds[0]
    assert image.shape == (3, 736, 1280) and mask.shape == (736, 1280)
    assert (mask[720:] == IGNORE_INDEX).all() and (mask[:720] != IGNORE_INDEX).all()
    assert image[:, 720:].abs().sum() > 0  # normalised zeros are not zero; image kept at top-left
    raw = np.asarray(Image.open(frame).convert("RGB"), np.float32) / 255
    denorm = image[:, :720].permute(1, 2, 0).numpy() * np.array([0.229, 0.224, 0.225]) + np.array(
        [0.485, 0.456, 0.406]
    )
    assert np.abs(denorm - raw).max() < 1e-4
    assert mask[120, 300] == 1 and mask[250, 150] == 0  # inside and outside the triangle


def test_augmentations_keep_masks_aligned() -> None:
    # Each class gets its own colour; after any augmentation the colour must still match the label.
    palette = np.array([[0, 0, 250], [250, 0, 0], [0, 250, 0], [250, 250, 0]], np.uint8)
    index = np.kron(_mask(8), np.ones((8, 8), np.uint8))  # blocky (64, 64)
    dataset = SegmentationDataset(
        [Item(Path("x"), Path("y"))], train_transform(DataConfig(crop_size=32)), 4
    )
    dataset._cache.update({0: (palette[index], index)})
    for epoch in range(8):
        dataset.set_epoch(epoch)
        image, mask = dataset[0]
        keep = mask != IGNORE_INDEX
        rgb = image.permute(1, 2, 0).numpy() * np.array([0.229, 0.224, 0.225]) + np.array(
            [0.485, 0.456, 0.406]
        )
        colour_class = np.argmin(((rgb[..., None, :] * 255 - palette[None, None]) ** 2).sum(-1), -1)
        interior = keep.numpy() & (np.abs(rgb * 255 - palette[colour_class]).max(-1) < 40)
        assert interior.sum() > 0.5 * keep.sum().item()
        assert (colour_class[interior] == mask.numpy()[interior]).all()


def test_augmentation_is_deterministic_per_epoch_and_index() -> None:
    image, mask = generate_sample(np.random.default_rng(0), 64, 4)
    ds = SegmentationDataset(
        [Item(Path("x"), Path("y"))], train_transform(DataConfig(crop_size=32)), 4, seed=3
    )
    ds._cache.update({0: (image, mask)})
    ds.set_epoch(1)
    a = ds[0]
    b = ds[0]
    ds.set_epoch(2)
    c = ds[0]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_augmentations_fire_independently() -> None:
    """Each transform draws its own chance: about 2.5 % of crops come out untouched
    (0.2 * 0.5^3) and some are only flipped or turned (no affine). A pipeline seeded with one
    seed per transform fires them all together: about 20 % untouched, none only flipped."""
    image, mask = generate_sample(np.random.default_rng(0), 32, 4)
    ds = SegmentationDataset(
        [Item(Path(str(i)), Path("y")) for i in range(200)],
        train_transform(DataConfig(crop_size=32)),
        4,
        seed=5,
    )
    ds._cache.update({i: (image, mask) for i in range(200)})
    plain = SegmentationDataset([Item(Path("x"), Path("y"))], eval_transform(DataConfig()), 4)
    plain._cache.update({0: (image, mask)})
    ref = plain[0][0]  # (3, 32, 32)
    turns = [torch.rot90(ref, k, (-2, -1)) for k in range(4)]
    dihedral = turns + [t.flip(-1) for t in turns]
    untouched = flipped_only = 0
    for i in range(200):
        out = ds[(1, i)][0]
        untouched += torch.equal(out, ref)
        flipped_only += any(torch.equal(out, v) for v in dihedral[1:])
    assert untouched < 20 and flipped_only > 10


def test_epoch_sampler_shuffles_per_epoch_and_carries_the_epoch() -> None:
    sampler = EpochSampler(10, seed=3)
    sampler.set_epoch(1)
    first = list(sampler)
    assert {e for e, _ in first} == {1} and sorted(i for _, i in first) == list(range(10))
    assert list(sampler) == first  # depends only on (seed, epoch): exact on resume
    sampler.set_epoch(2)
    assert [i for _, i in sampler] != [i for _, i in first]


def test_synthetic_set_is_deterministic_with_sscs_like_shares(tmp_path: Path) -> None:
    a = [generate_sample(np.random.default_rng(7), 64, 4) for _ in range(2)]
    b = [generate_sample(np.random.default_rng(7), 64, 4) for _ in range(2)]
    assert all(
        np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b, strict=True)
    )
    rng = np.random.default_rng(0)
    counts = sum(
        np.bincount(generate_sample(rng, 64, 4)[1].ravel(), minlength=4) for _ in range(30)
    )
    share = counts / counts.sum()
    assert 0.65 < share[0] < 0.92
    assert 0 < share[3] < min(share[1], share[2])
    three = generate_sample(np.random.default_rng(0), 64, 3)[1]
    assert three.max() <= 2
    out = write_synthetic(tmp_path / "s", train=3, test=2, size=32, classes=4, seed=0)
    stamp = (out / "train" / "images" / "00000.png").stat().st_mtime_ns
    write_synthetic(tmp_path / "s", train=3, test=2, size=32, classes=4, seed=0)
    assert (out / "train" / "images" / "00000.png").stat().st_mtime_ns == stamp
    assert check_dataset(out, "folder") == []
    table = class_distribution(out, "synthetic")
    assert table.groupby("split")["percent"].sum().round(6).tolist() == [100.0, 100.0]


def test_folder_problems_are_each_reported(tmp_path: Path) -> None:
    root = write_synthetic(tmp_path / "f", train=6, test=1, size=32, classes=4, seed=0)
    images, masks = root / "train" / "images", root / "train" / "masks"
    (images / "00000.png").write_bytes(b"not an image")
    data = (images / "00001.png").read_bytes()
    (images / "00001.png").write_bytes(data[: len(data) // 2])  # truncated
    (masks / "00002.png").unlink()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(masks / "orphan.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(masks / "00003.png")
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(masks / "00004.png")
    reasons = {p.path.name: p.reason for p in check_dataset(root, "folder")}
    assert set(reasons) == {
        "00000.png",
        "00001.png",
        "00002.png",
        "orphan.png",
        "00003.png",
        "00004.png",
    }
    assert "unreadable" in reasons["00000.png"] and "unreadable" in reasons["00001.png"]
    assert reasons["00002.png"] == "image without mask"
    assert reasons["orphan.png"] == "mask without image"
    assert "differs from image size" in reasons["00003.png"]
    assert "[9]" in reasons["00004.png"]


def test_missing_root_and_unknown_format_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="data root not found"):
        check_dataset(tmp_path / "nope", "folder")
    with pytest.raises(UserError, match="allowed: sscs, nea, folder"):
        check_dataset(tmp_path, "coco")
    with pytest.raises(UserError, match="needs --data-root"):
        build_datasets(DataConfig(dataset="sscs"), 0)
    with pytest.raises(UserError, match="expected folder"):
        build_datasets(DataConfig(dataset="sscs", root=str(tmp_path)), 0)


def test_rasterise_draws_c1_before_c2() -> None:
    square = ((0.0, 0.0), (9.0, 0.0), (9.0, 9.0), (0.0, 9.0))
    mask = rasterise(((2, square), (1, square)), 10, 10)
    assert (mask == 2).all()


def test_synthetic_config_feeds_the_loader() -> None:
    cfg = DataConfig(
        dataset="synthetic", crop_size=32, synthetic=SynthConfig(train=5, test=2, size=32)
    )
    ds = build_datasets(cfg, seed=0)
    assert len(ds.train) == 4 and len(ds.val) == 1 and len(ds.test) == 2


def test_concurrent_trials_generate_one_synthetic_set(tmp_path: Path) -> None:
    """Trials of a sweep start together and each generates the set it needs: none may destroy
    another's half-written copy."""
    from concurrent.futures import ThreadPoolExecutor

    out = tmp_path / "synthetic"
    params = {"train": 6, "test": 3, "size": 32, "classes": 4, "seed": 0}
    with ThreadPoolExecutor(4) as pool:
        roots = list(pool.map(lambda _: write_synthetic(out, **params), range(4)))
    assert roots == [out] * 4
    assert json.loads((out / "synthetic.json").read_text()) == params
    assert len(list((out / "train" / "images").iterdir())) == 6
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic"]  # no temporary copy left
