"""The decoded-image cache: same arrays as decoding, memory-mapped on reuse, invalidated by an
edited source or a new resize, never trusted when damaged, optional when the disk refuses."""

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainables.config import DataConfig, SynthConfig
from trainables.data import build_datasets, cache_root, decoded_root
from trainables.data.cache import cache_key, cached, decode
from trainables.data.dataset import SegmentationDataset
from trainables.data.formats import Item


def _item(tmp_path: Path, h: int = 40, w: int = 60, seed: int = 0) -> Item:
    rng = np.random.default_rng(seed)
    image, mask = tmp_path / f"img{seed}.png", tmp_path / f"mask{seed}.png"
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(image)
    Image.fromarray(rng.integers(0, 4, (h, w), dtype=np.uint8)).save(mask)
    return Item(image, mask)


def test_cached_arrays_equal_decoding_and_are_mapped_the_second_time(tmp_path: Path) -> None:
    item, root = _item(tmp_path), tmp_path / "cache"
    first = cached(item, 4, None, root)
    second = cached(item, 4, None, root)
    fresh = decode(item, 4, None)
    for a, b, c in zip(first, second, fresh, strict=True):
        assert np.array_equal(a, c) and np.array_equal(b, c) and c.dtype == np.uint8
    assert isinstance(second[0], np.memmap) and not second[0].flags.writeable
    assert sorted(p.name.split(".", 1)[1] for p in root.iterdir()) == ["image.npy", "mask.npy"]


def test_resize_happens_once_at_decoding(tmp_path: Path) -> None:
    item = _item(tmp_path, 40, 60)
    image, mask = cached(item, 4, 30, tmp_path / "cache")
    assert image.shape == (20, 30, 3) and mask.shape == (20, 30)
    assert set(np.unique(mask)) <= {0, 1, 2, 3}  # nearest: no blended labels


def test_an_edited_image_or_a_new_resize_is_a_new_key(tmp_path: Path) -> None:
    item = _item(tmp_path)
    key = cache_key(item, 4, None)
    assert cache_key(item, 4, 32) != key and cache_key(item, 3, None) != key
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(item.image)
    os.utime(item.image, ns=(1, 1))  # a different size or mtime is a different file
    assert cache_key(item, 4, None) != key
    assert cached(item, 4, None, tmp_path / "cache")[0].max() == 0


def test_a_damaged_cache_file_is_decoded_again(tmp_path: Path) -> None:
    item, root = _item(tmp_path), tmp_path / "cache"
    cached(item, 4, None, root)
    image_file = root / f"{cache_key(item, 4, None)}.image.npy"
    image_file.write_bytes(image_file.read_bytes()[:100])  # truncated
    image, _ = cached(item, 4, None, root)
    assert np.array_equal(image, decode(item, 4, None)[0])
    assert np.load(image_file).shape == (40, 60, 3)  # rewritten whole


def test_an_unwritable_cache_warns_and_still_decodes(tmp_path: Path) -> None:
    item = _item(tmp_path)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="not-a-folder"):
        image, mask = cached(item, 4, None, blocker / "cache")
    assert image.shape == (40, 60, 3) and mask.shape == (40, 60)


def test_datasets_share_one_cache_and_can_do_without(tmp_path: Path) -> None:
    synthetic = SynthConfig(train=6, test=2, size=32, classes=4, seed=0)
    cfg = DataConfig(root=str(tmp_path / "synthetic"), crop_size=32, synthetic=synthetic)
    data = build_datasets(cfg, 0)
    for split in (data.train, data.val, data.test):
        for i in range(len(split)):
            split[i]
    files = sorted(decoded_root().glob("*.npy"))
    assert len(files) >= 2 * 8
    again = build_datasets(cfg, 0, augment="device")
    assert isinstance(again.train.raw(0)[0], np.memmap)
    assert sorted(decoded_root().glob("*.npy")) == files  # nothing decoded twice
    off = build_datasets(dataclasses.replace(cfg, cache=False), 0)
    assert not isinstance(off.train.raw(0)[0], np.memmap)


def test_a_dataset_keeps_a_bounded_number_of_maps_open(tmp_path: Path) -> None:
    """Each map holds a file descriptor: beyond `max_maps` the least recently read item is
    unmapped, and mapped again when read."""
    items = [_item(tmp_path, seed=i) for i in range(5)]
    dataset = SegmentationDataset(items, None, 4, cache=tmp_path / "cache")
    dataset.max_maps = 2
    fds = len(os.listdir("/proc/self/fd"))
    for i in [0, 1, 2, 3, 4, 3, 0]:
        image, _ = dataset.raw(i)
        assert np.array_equal(image, decode(items[i], 4, None)[0])
    del image
    assert list(dataset._cache) == [3, 0]
    assert len(os.listdir("/proc/self/fd")) <= fds + 2 * 2


def test_a_relative_cache_folder_means_where_the_process_started(
    tmp_path: Path, monkeypatch
) -> None:
    (tmp_path / "trial").mkdir()
    monkeypatch.chdir(tmp_path / "trial")  # Ray runs a trial in a folder of its own
    monkeypatch.setenv("CORROPRUNE_CACHE", "cache")
    monkeypatch.setenv("TUNE_ORIG_WORKING_DIR", str(tmp_path))
    assert cache_root() == tmp_path / "cache"
    monkeypatch.setenv("CORROPRUNE_CACHE", "~/corroprune-cache")
    assert cache_root() == Path.home() / "corroprune-cache"
