"""`data check` lists every problem in one pass; a wrong SSCS variant names the one present."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sweep.cli import main
from tests.trainables.data.test_formats import make_nea, make_sscs
from trainables.config import DataConfig
from trainables.data import build_datasets
from trainables.data.check import check_dataset, class_distribution
from trainables.data.formats import SSCS_FOLDER, nea_items
from trainables.errors import UserError


def _edit_nea(root: Path) -> None:
    """Six frames, each broken in its own way but the first; plus an unannotated frame."""
    path = root / "res.json"
    entries = list(json.loads(path.read_text()).values())
    entries[1]["regions"][0]["region_attributes"]["isCorroded"] = "rusty"
    entries[2]["regions"][1]["shape_attributes"]["all_points_y"].pop()
    del entries[3]["filename"]
    (root / entries[4]["filename"]).unlink()
    (root / entries[5]["filename"]).rename(root / "frame_a.jpg")
    entries[5]["filename"] = "frame_a.jpg"
    path.write_text(json.dumps({f"key{i}": e for i, e in enumerate(entries)}))
    Image.fromarray(np.zeros((40, 64, 3), np.uint8)).save(root / "99_693.jpg")


def test_nea_check_lists_every_bad_entry(tmp_path: Path) -> None:
    make_nea(tmp_path, frames=6)
    _edit_nea(tmp_path)
    problems = {(p.path.name, p.reason) for p in check_dataset(tmp_path, "nea")}
    assert len(problems) == 7, problems
    reasons = " | ".join(f"{name}: {reason}" for name, reason in sorted(problems))
    assert "res.json: entry '2_14.jpg' region 0: isCorroded 'rusty', expected one of" in reasons
    assert "res.json: entry '3_21.jpg' region 1: " in reasons and "equal-length" in reasons
    assert "res.json: entry 'key3' has no 'filename'" in reasons
    assert "5_35.jpg: listed in res.json but the image file is missing" in reasons
    assert "frame_a.jpg: frame name has no frame number" in reasons
    assert "99_693.jpg: image without annotation in res.json" in reasons
    assert "4_28.jpg: image without annotation in res.json" in reasons  # its entry has no name


def test_nea_loading_names_the_first_problem_and_how_to_list_all(tmp_path: Path) -> None:
    make_nea(tmp_path, frames=6)
    _edit_nea(tmp_path)
    with pytest.raises(UserError, match=r"2_14.jpg' region 0.*3 more.*data check .* --format nea"):
        nea_items(tmp_path, block_size=1)


def test_nea_frame_without_number_is_refused(tmp_path: Path) -> None:
    make_nea(tmp_path, frames=2)
    path = tmp_path / "res.json"
    data = json.loads(path.read_text())
    data["key0"] = {**next(iter(data.values())), "filename": "frame_a.jpg"}
    path.write_text(json.dumps(data))
    Image.fromarray(np.zeros((40, 64, 3), np.uint8)).save(tmp_path / "frame_a.jpg")
    with pytest.raises(UserError, match=r"frame_a.jpg: frame name has no frame number"):
        nea_items(tmp_path, block_size=1)
    assert [(p.path.name, p.reason.split(";")[0]) for p in check_dataset(tmp_path, "nea")] == [
        ("frame_a.jpg", "frame name has no frame number")
    ]


def test_sscs_missing_variant_names_the_one_present(tmp_path: Path) -> None:
    make_sscs(tmp_path, "original", "rgb", n=2)
    problems = check_dataset(tmp_path, "sscs", sscs_variant="512x512")
    assert [p.path for p in problems] == [tmp_path / SSCS_FOLDER / "512x512"]
    assert "holds 'original/'" in problems[0].reason
    assert "--sscs-variant original" in problems[0].reason
    assert "--set data.sscs_variant=original" in problems[0].reason
    with pytest.raises(
        UserError, match=r"512x512: folder missing.*--set data.sscs_variant=original"
    ):
        build_datasets(DataConfig(dataset="sscs", root=str(tmp_path)), 0)
    with pytest.raises(UserError, match=r"--sscs-variant original"):
        class_distribution(tmp_path, "sscs", sscs_variant="512x512")


def test_sscs_variant_is_detected(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_sscs(tmp_path, "original", "rgb", n=2)
    assert check_dataset(tmp_path, "sscs", sscs_variant="auto") == []
    assert main(["data", "check", str(tmp_path), "--format", "sscs"]) == 0
    assert main(["data", "stats", str(tmp_path), "--format", "sscs"]) == 0
    assert "SSCS variant original (detected" in capsys.readouterr().out
    make_sscs(tmp_path, "512x512", "rgb", n=1)
    tables = class_distribution(tmp_path, "sscs", sscs_variant="auto")
    assert tables["pixels"].sum() == 2 * 32 * 32  # one image per split: the 512x512 set wins
