"""What a re-run of a sweep accepts and refuses, the GPU request, the driver's checks. No Ray."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sweep.cli import main
from sweep.grid import SweepConfig, absolute_paths, expand
from sweep.tune import (
    SweepRequest,
    _check_run_dir,
    _init_ray,
    gpus_per_trial,
    trial_environment,
)
from tests.conftest import tiny_config
from trainables.config import TrialConfig
from trainables.errors import UserError
from trainables.provenance import code_version
from trainables.ray_entry import check_code_version

SWEEP = {"datasets": ["synthetic"], "models": ["fpn"], "pruners": ["agp"], "sparsities": [0.5]}


def _request(tmp_path: Path, **sweep) -> SweepRequest:
    config = SweepConfig.from_dict({**SWEEP, **sweep})
    return SweepRequest("tiny", config, tiny_config(), tmp_path, {})


def _written(tmp_path: Path, **sweep) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(_check_run_dir(_request(tmp_path, **sweep), tmp_path)))
    return path


@pytest.mark.parametrize(
    "changed",
    [{"gpus_per_trial": 0.5}, {"cpus_per_trial": 8}, {"max_concurrent": 3}, {"max_failures": 5}],
)
def test_resume_may_change_resources(tmp_path: Path, changed: dict) -> None:
    _written(tmp_path, gpus_per_trial=1, cpus_per_trial=4)
    resolved = _check_run_dir(_request(tmp_path, **changed), tmp_path)
    assert resolved["sweep"] == {**resolved["sweep"], **changed}  # the new resources are recorded


def test_resume_may_switch_int8_records_on_or_off(tmp_path: Path) -> None:
    """They add records beside a trial's results and change none (run_stage fills in the INT8
    records of trials finished before it was on)."""
    _written(tmp_path)
    resolved = _check_run_dir(_request(tmp_path, deploy_int8=True), tmp_path)
    assert resolved["sweep"]["deploy_int8"] is True
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(resolved))
    assert _check_run_dir(_request(tmp_path), tmp_path)["sweep"]["deploy_int8"] is False


def test_resume_refuses_other_results_settings_and_names_them(tmp_path: Path) -> None:
    _written(tmp_path)
    with pytest.raises(UserError, match=r"sweep\.sparsities \(\[0\.5\] -> \[0\.9\]\)"):
        _check_run_dir(_request(tmp_path, sparsities=[0.9]), tmp_path)
    other = dataclasses.replace(_request(tmp_path), template=tiny_config(seed=3))
    with pytest.raises(UserError, match=r"trial\.seed \(0 -> 3\)"):
        _check_run_dir(other, tmp_path)


def test_resume_may_add_seeds_but_not_drop_them(tmp_path: Path) -> None:
    _written(tmp_path)  # no sweep.seeds: the template's seed 0
    grown = _check_run_dir(_request(tmp_path, seeds=[0, 1, 2]), tmp_path)
    assert grown["sweep"]["seeds"] == [0, 1, 2]
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(grown))
    with pytest.raises(UserError, match=r"seeds may be added, not removed; missing \[2\]"):
        _check_run_dir(_request(tmp_path, seeds=[0, 1]), tmp_path)


def test_resume_refuses_another_code_version(tmp_path: Path) -> None:
    path = _written(tmp_path)
    recorded = yaml.safe_load(path.read_text())
    assert recorded["code_version"] == code_version()
    path.write_text(yaml.safe_dump({**recorded, "code_version": "0.0.1+0123456789ab"}))
    with pytest.raises(UserError, match=r"written by corroprune 0\.0\.1\+0123456789ab"):
        _check_run_dir(_request(tmp_path), tmp_path)
    del recorded["code_version"]  # written before versions were recorded: resumes, with a warning
    path.write_text(yaml.safe_dump(recorded))
    assert _check_run_dir(_request(tmp_path), tmp_path)["code_version"] == code_version()


def test_a_node_with_other_code_refuses_to_run_a_trial() -> None:
    check_code_version(code_version(), "10.0.0.5")
    check_code_version(None, "10.0.0.5")  # a trial started outside a sweep
    with pytest.raises(UserError, match="node 10.0.0.5 runs corroprune .* driver runs 0.0.1"):
        check_code_version("0.0.1+0123456789ab", "10.0.0.5")


@pytest.mark.parametrize(
    ("requested", "gpus_now", "can_add", "expected"),
    [
        (1, 0, True, 1),  # autoscaler with GPU node types, none launched yet (cluster.yaml)
        (1, 0, None, 1),  # an autoscaler whose node types are unknown here: ask, it decides
        (0.5, 0, True, 0.5),
        (1, 2, False, 1),  # GPUs present
        (1, 0, False, 0),  # nothing can ever add a GPU (this machine)
        (0, 0, True, 0),
    ],
)
def test_gpus_fall_back_to_zero_only_where_none_can_ever_appear(
    requested: float, gpus_now: float, can_add: bool | None, expected: float
) -> None:
    assert gpus_per_trial(requested, gpus_now, can_add) == expected


@pytest.mark.parametrize(("address", "joins"), [(None, "local"), ("auto", "auto")])
def test_without_an_address_the_sweep_starts_a_ray_of_its_own(
    address: str | None, joins: str, monkeypatch
) -> None:
    """Not the cluster `ray start` left on this machine, which Ray's own default would join (and
    then refuse the CPU count given for the local one)."""
    import ray

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    _init_ray(address)
    assert [c["address"] for c in calls] == [joins]


def test_relative_paths_become_absolute_in_the_driver(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    template = tiny_config(model={"encoder_weights": "weights/encoder.pt"})
    dense, pruned = expand(SweepConfig.from_dict(SWEEP), template, Path("run"), {})
    for spec in dense + pruned:
        assert spec.config["model"]["encoder_weights"] == str(tmp_path / "weights" / "encoder.pt")
        assert Path(spec.out_dir).is_absolute()
    folder = TrialConfig.from_dict(
        tiny_config(data={"dataset": "folder", "root": "data", "num_classes": 4})
    )
    assert absolute_paths(folder).data.root == str(tmp_path / "data")
    monkeypatch.setenv("CORROPRUNE_CACHE", "cache")
    assert trial_environment() == {"CORROPRUNE_CACHE": str(tmp_path / "cache")}
    monkeypatch.delenv("CORROPRUNE_CACHE")
    assert trial_environment() == {}  # each node keeps its own default


def _folder_dataset(root: Path) -> list[Path]:
    """A folder-format set with three bad files; returns them."""
    for split in ("train", "test"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(
                root / split / "images" / f"{i}.png"
            )
            Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / split / "masks" / f"{i}.png")
    bad_value = root / "train" / "masks" / "1.png"
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(bad_value)
    unreadable = root / "test" / "images" / "2.png"
    unreadable.write_bytes(b"not a png")
    orphan = root / "train" / "images" / "9.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(orphan)
    return [bad_value, unreadable, orphan]


def test_a_bad_dataset_stops_the_sweep_before_any_trial(tmp_path: Path, capsys) -> None:
    bad = _folder_dataset(tmp_path / "data")
    preset = tmp_path / "tiny.yaml"
    trial = tiny_config(data={"dataset": "folder", "num_classes": 4})
    preset.write_text(yaml.safe_dump({"trial": trial, "sweep": {**SWEEP, "datasets": ["folder"]}}))
    out = tmp_path / "run"
    argv = ["sweep", "--preset", str(preset), "--data-root", str(tmp_path / "data")]
    code = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "3 bad file(s) listed above; no trial was started" in err and "--skip-data-check" in err
    assert all(str(path) in err for path in bad)
    assert not out.exists()  # nothing written, no Ray started


@pytest.mark.parametrize(
    ("worker", "expected"),
    [
        ({"resources": {"CPU": 8, "GPU": 1}, "min_workers": 0, "max_workers": 10}, True),
        ({"resources": {"CPU": 8, "GPU": 1}, "max_workers": 0}, False),
        ({"resources": {"CPU": 8}, "max_workers": 10}, False),
    ],
)
def test_a_launcher_clusters_node_types_say_whether_gpus_can_appear(
    tmp_path: Path, monkeypatch, worker: dict, expected: bool
) -> None:
    """On a cluster launcher's head, the autoscaler's own config (as Ray Tune reads it)."""
    from sweep.tune import _cluster_can_add_gpus

    monkeypatch.setenv("HOME", str(tmp_path))
    nodes = {"head": {"resources": {"CPU": 0}}, "gpu_worker": worker}
    (tmp_path / "ray_bootstrap_config.yaml").write_text(
        yaml.safe_dump({"available_node_types": nodes})
    )
    assert _cluster_can_add_gpus() is expected
