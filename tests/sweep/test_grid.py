"""Grid expansion and sweep settings, without Ray."""

from pathlib import Path

import pytest
import yaml

from sweep.config import load_preset
from sweep.grid import SweepConfig, expand, parse_roots
from trainables.errors import UserError


def test_paper_preset_is_ten_plus_ninety_trials(tmp_path: Path) -> None:
    preset = load_preset("paper")
    sweep = SweepConfig.from_dict(preset["sweep"])
    roots = {"sscs": str(tmp_path), "nea": str(tmp_path)}
    dense, pruned = expand(sweep, preset["trial"], tmp_path, roots)
    assert len(dense) == 10 and len(pruned) == 90
    assert len({s.name for s in dense + pruned}) == 100
    nea = next(s for s in pruned if s.name == "nea-fpn-agp-s0.9-seed0")
    assert nea.base == "nea-fpn-dense-seed0" and nea.warm_start.endswith(
        "nea-fpn-dense-seed0/checkpoints/dense.pt"
    )
    assert nea.config["data"]["dataset"] == "nea" and nea.config["data"]["root"] == str(tmp_path)
    assert nea.config["pruning"] == {**nea.config["pruning"], "pruner": "agp", "sparsity": 0.9}
    assert all(s.config["pruning"]["pruner"] == "none" for s in dense)


def test_demo_preset_is_the_full_shape_on_synthetic_data(tmp_path: Path) -> None:
    preset = load_preset("demo")
    dense, pruned = expand(SweepConfig.from_dict(preset["sweep"]), preset["trial"], tmp_path, {})
    assert (len(dense), len(pruned)) == (5, 45)


def test_granularity_axis_adds_channel_trials_beside_the_paper_grid(tmp_path: Path) -> None:
    sweep = SweepConfig.from_dict(
        {"datasets": ["synthetic"], "models": ["fpn"], "granularities": "element,channel"}
    )
    dense, pruned = expand(sweep, {}, tmp_path, {})
    assert (len(dense), len(pruned)) == (1, 18)
    channel = next(s for s in pruned if s.name == "synthetic-fpn-agp-channel-s0.5-seed0")
    assert channel.config["pruning"]["granularity"] == "channel"
    assert channel.base == "synthetic-fpn-dense-seed0"
    element = next(s for s in pruned if s.name == "synthetic-fpn-agp-s0.5-seed0")
    assert element.config["pruning"]["granularity"] == "element"
    with pytest.raises(UserError, match="allowed values are element, channel"):
        SweepConfig.from_dict({"granularities": ["filter"]})


def test_seed_axis_gives_each_seed_its_own_bases_and_combinations(tmp_path: Path) -> None:
    sweep = SweepConfig.from_dict(
        {"datasets": ["synthetic"], "models": ["fpn"], "pruners": ["agp"], "seeds": "0,1,2"}
    )
    template = {"seed": 7, "data": {"split_seed": 0}}
    dense, pruned = expand(sweep, template, tmp_path, {})
    assert [s.name for s in dense] == [f"synthetic-fpn-dense-seed{i}" for i in range(3)]
    assert [s.config["seed"] for s in dense] == [0, 1, 2]
    assert len(pruned) == 9 and {s.config["data"]["split_seed"] for s in pruned} == {0}
    for spec in pruned:  # warm-started from its own seed's base
        assert spec.base == f"synthetic-fpn-dense-seed{spec.config['seed']}"
    one, _ = expand(SweepConfig.from_dict({"datasets": ["synthetic"]}), template, tmp_path, {})
    assert {s.config["seed"] for s in one} == {7}  # no seeds axis: the template's seed
    for bad in ("0,0", "-1", "a", []):
        with pytest.raises(UserError, match="sweep.seeds"):
            SweepConfig.from_dict({"seeds": bad})


def test_sweep_settings_reject_unknown_keys_and_values() -> None:
    with pytest.raises(UserError, match="unknown sweep key 'gpu'"):
        SweepConfig.from_dict({"gpu": 1})
    with pytest.raises(UserError, match="allowed values are unet"):
        SweepConfig.from_dict({"models": ["deeplab"]})
    with pytest.raises(UserError, match="in \\(0, 1\\)"):
        SweepConfig.from_dict({"sparsities": [1.0]})


def test_deploy_int8_from_the_preset_or_the_flag(tmp_path: Path, capsys) -> None:
    from sweep.cli import build_parser, main
    from sweep.tune_cli import build_request

    assert SweepConfig.from_dict({}).deploy_int8 is False
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"sweep": {"datasets": ["synthetic"], "deploy_int8": True}}))
    argv = ["sweep", "--preset", str(preset), "--out", str(tmp_path / "run")]
    for flags, expected in (([], True), (["--no-deploy-int8"], False), (["--deploy-int8"], True)):
        args = build_parser().parse_args([*argv, *flags])
        assert build_request(args).sweep.deploy_int8 is expected
    for bad in ("yes please", 1, None):
        with pytest.raises(UserError, match=f"sweep.deploy_int8 {bad!r}: expected true or false"):
            SweepConfig.from_dict({"deploy_int8": bad})
    preset.write_text(yaml.safe_dump({"sweep": {"deploy_int8": "sometimes"}}))
    assert main(argv) == 2
    assert "error: sweep.deploy_int8 'sometimes': expected true or false" in capsys.readouterr().err


def test_data_roots_are_named_and_checked(tmp_path: Path) -> None:
    assert parse_roots([f"sscs={tmp_path}"], ("sscs", "nea")) == {"sscs": str(tmp_path)}
    assert parse_roots([str(tmp_path)], ("sscs",)) == {"sscs": str(tmp_path)}
    with pytest.raises(UserError, match="name the dataset"):
        parse_roots([str(tmp_path)], ("sscs", "nea"))
    with pytest.raises(UserError, match="folder not found"):
        parse_roots([f"nea={tmp_path / 'x'}"], ("nea",))
    with pytest.raises(UserError, match="needs a data root"):
        expand(SweepConfig.from_dict({"datasets": ["sscs"]}), {}, tmp_path, {})
