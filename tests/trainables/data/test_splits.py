"""NEA splits: frame blocks, the guard gap between splits, and a test split fixed per dataset."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainables.config import DataConfig, SynthConfig, TrialConfig
from trainables.data import Datasets, build_datasets
from trainables.data.formats import frame_index
from trainables.errors import UserError


def make_via(root: Path, frames: int) -> None:
    """Frames `<n>_<7n>.jpg` and a VIA 1.x `res.json` shaped like NEA's (entries keyed by file
    name and size, in file-name order, so frame 100 comes before frame 12; regions as a dict)."""
    entries = {}
    for n in sorted(range(1, frames + 1), key=lambda n: f"{n}_{7 * n}.jpg"):
        name = f"{n}_{7 * n}.jpg"
        Image.fromarray(np.full((32, 32, 3), n % 256, np.uint8)).save(root / name)
        region = {
            "shape_attributes": {
                "name": "polygon",
                "all_points_x": [2, 20, 20, 2],
                "all_points_y": [2, 2, 20, 20],
            },
            "region_attributes": {"isCorroded": "corroded_c1" if n % 2 else "corroded_c2"},
        }
        entries[f"{name}1234"] = {
            "fileref": "",
            "size": 1234,
            "filename": name,
            "base64_img_data": "",
            "file_attributes": {},
            "regions": {"0": region},
        }
    (root / "res.json").write_text(json.dumps(entries))


@pytest.fixture(scope="module")
def nea(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nea")
    make_via(root, frames=120)
    return root


def _frames(data: Datasets) -> dict[str, np.ndarray]:
    splits = {"train": data.train, "val": data.val, "test": data.test}
    return {k: np.array([frame_index(it.image.name) for it in s.items]) for k, s in splits.items()}


def _gap(a: np.ndarray, b: np.ndarray) -> int:
    """The smallest frame-number distance between a frame of `a` and one of `b`."""
    return int(np.abs(a[:, None] - b[None, :]).min())


@pytest.mark.parametrize(("block", "guard"), [(10, None), (5, 2)])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_guard_keeps_every_split_away_from_training(
    nea: Path, block: int, guard: int | None, seed: int
) -> None:
    kwargs = {} if guard is None else {"nea_guard_blocks": guard}
    cfg = DataConfig(
        dataset="nea", root=str(nea), cache=False, nea_block_size=block, split_seed=seed, **kwargs
    )
    frames = _frames(build_datasets(cfg, seed))
    gap = block * (guard or 1)  # the default guard is one block
    assert all(len(f) for f in frames.values())
    held_out = np.concatenate([frames["train"], frames["val"]])
    assert _gap(frames["test"], held_out) > gap
    assert _gap(frames["val"], frames["train"]) > gap
    assert sum(map(len, frames.values())) < 120  # guard blocks belong to no split


def test_test_split_is_fixed_and_val_follows_the_split_seed(nea: Path) -> None:
    cfg = DataConfig(dataset="nea", root=str(nea), cache=False, nea_block_size=10)
    runs = {s: _frames(build_datasets(replace(cfg, split_seed=s), 0)) for s in range(6)}
    tests = {tuple(r["test"]) for r in runs.values()}
    assert len(tests) == 1
    again = _frames(build_datasets(replace(cfg, split_seed=3), 0))
    assert all(np.array_equal(again[k], runs[3][k]) for k in again)
    assert len({tuple(sorted(r["val"])) for r in runs.values()}) > 1


@pytest.mark.parametrize("dataset", ["nea", "synthetic"])
def test_training_seed_leaves_every_split_alone(nea: Path, tmp_path: Path, dataset: str) -> None:
    """Repeated seeds of a sweep vary the training only: one split for every trial seed."""
    if dataset == "nea":
        cfg = DataConfig(dataset="nea", root=str(nea), cache=False, nea_block_size=10)
    else:
        small = SynthConfig(train=12, test=4, size=32)
        cfg = DataConfig(
            dataset="synthetic", root=str(tmp_path / "synth"), cache=False, synthetic=small
        )
    splits = []
    for seed in range(4):
        data = build_datasets(cfg, seed)
        splits.append(
            [sorted(str(i) for i in part.items) for part in (data.train, data.val, data.test)]
        )
    assert all(split == splits[0] for split in splits)


def test_guard_zero_restores_adjacent_blocks(nea: Path) -> None:
    cfg = DataConfig(dataset="nea", root=str(nea), cache=False, nea_guard_blocks=0)
    frames = _frames(build_datasets(cfg, 0))
    assert _gap(frames["test"], np.concatenate([frames["train"], frames["val"]])) == 1
    assert sum(map(len, frames.values())) == 120


def test_val_share_stays_close_to_val_fraction(tmp_path: Path) -> None:
    make_via(tmp_path, frames=292)  # NEA's size
    cfg = DataConfig(dataset="nea", root=str(tmp_path), cache=False)
    for seed in range(5):
        frames = _frames(build_datasets(cfg, seed))
        share = len(frames["val"]) / (len(frames["val"]) + len(frames["train"]))
        assert 0.1 <= share <= 0.3, (seed, share)
        assert len(frames["test"]) == 52  # blocks 4, 9, ... 29: every fifth, as before


def test_tiny_nea_splits_or_names_the_settings(tmp_path: Path) -> None:
    make_via(tmp_path, frames=20)  # five blocks of four: val, guard, train, guard, test
    cfg = DataConfig(dataset="nea", root=str(tmp_path), cache=False, nea_block_size=4)
    frames = _frames(build_datasets(cfg, 0))
    assert [len(frames[k]) for k in ("train", "val", "test")] == [4, 4, 4]
    with pytest.raises(UserError, match=r"data\.nea_block_size.*data\.nea_guard_blocks"):
        build_datasets(DataConfig(dataset="nea", root=str(tmp_path), nea_block_size=5), 0)


@pytest.mark.parametrize(
    ("value", "reason"),
    [(-1, "is -1; expected 0 or more"), (1.5, "whole number"), ("one", "must be a number")],
)
def test_bad_guard_is_rejected_naming_the_key(value: object, reason: str) -> None:
    with pytest.raises(UserError, match=rf"'data\.nea_guard_blocks'.*{reason}"):
        TrialConfig.from_dict({"data": {"dataset": "nea", "nea_guard_blocks": value}})
