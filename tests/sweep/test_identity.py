"""The trial identity: names, configs and `--select` agree, and old run folders still read."""

import dataclasses

import pytest

from sweep.identity import (
    AXES,
    COLUMNS,
    TrialId,
    grid,
    parse_select,
    sweep_grid,
    trial_id,
)


def _every_kind() -> list[TrialId]:
    dense, pruned = grid(
        ["sscs", "my-data"], ["fpn", "unetplusplus"], ["element", "channel"],
        ["lp", "agp", "mp", "magnitude"], [0.2, 0.5, 0.9, 0.25], [0, 1, 12],
    )  # fmt: skip
    return dense + pruned


@pytest.mark.parametrize("identity", _every_kind(), ids=lambda i: i.name)
def test_name_identity_name_round_trips(identity: TrialId) -> None:
    assert TrialId.from_name(identity.name) == identity
    assert TrialId.from_name(identity.name).name == identity.name


def test_names_are_unique_and_read_as_documented() -> None:
    identities = _every_kind()
    assert len({i.name for i in identities}) == len(identities)
    assert TrialId.from_name("sscs-fpn-agp-channel-s0.9-seed1") == TrialId(
        "sscs", "fpn", "agp", "channel", 0.9, 1
    )
    dense = TrialId.from_name("my-data-linknet-dense-seed2")
    assert (dense.dataset, dense.pruner, dense.granularity, dense.sparsity) == (
        "my-data", "none", "none", 0.0,
    )  # fmt: skip
    for bad in ("report", "sscs-fpn", "sscs-fpn-agp-s", "sscs-fpn-dense-seedx"):
        with pytest.raises(ValueError, match="not a trial name"):
            TrialId.from_name(bad)


@pytest.mark.parametrize(
    ("old", "expected"),
    [
        ("nea-unet-dense", TrialId("nea", "unet")),
        ("sscs-fpn-agp-s0.9", TrialId("sscs", "fpn", "agp", "element", 0.9)),
        ("sscs-fpn-mp-channel-s0.5", TrialId("sscs", "fpn", "mp", "channel", 0.5)),
    ],
)
def test_folders_from_before_the_seed_axis_read_as_seed_0(old: str, expected: TrialId) -> None:
    assert TrialId.from_name(old) == expected and expected.seed == 0


def test_config_wins_over_the_name_and_fills_the_encoder() -> None:
    config = {
        "seed": 3,
        "data": {"dataset": "sscs"},
        "model": {"arch": "fpn", "encoder": "resnet101"},
        "pruning": {"pruner": "agp", "sparsity": 0.9, "granularity": "element"},
    }
    got = trial_id("sscs-fpn-agp-s0.9", config)  # an old name; the config knows the seed
    assert got == TrialId("sscs", "fpn", "agp", "element", 0.9, 3, "resnet101")
    assert got.base == TrialId("sscs", "fpn", seed=3, encoder="resnet101")
    assert got.combination == dataclasses.replace(got, seed=0)
    assert trial_id("not-a-trial") is None
    assert trial_id("x", {"data": {}}) is None


def test_columns_and_select_follow_the_axes() -> None:
    identity = TrialId("sscs", "fpn", "agp", "channel", 0.5, 2, "resnet101")
    assert tuple(identity.columns()) == COLUMNS
    assert identity.columns()["target_sparsity"] == 0.5
    select = parse_select("model=fpn,sparsity=0.5,seed=2,granularity=channel")
    assert select == {"model": "fpn", "sparsity": 0.5, "seed": 2, "granularity": "channel"}
    assert identity.matches(select)
    assert not identity.matches({"seed": 1}) and not identity.matches({"sparsity": 0.9})
    assert set(parse_select("encoder=resnet101")) == {"encoder"}
    with pytest.raises(ValueError, match="KEY one of " + ", ".join(a.field for a in AXES)):
        parse_select("arch=fpn")
    with pytest.raises(ValueError, match="seed=one: expected an integer"):
        parse_select("seed=one")


def test_sweep_file_grid_counts_seeds_and_defaults() -> None:
    old = {
        "sweep": {"datasets": ["sscs"], "models": ["fpn"], "pruners": ["agp"], "sparsities": [0.5]}
    }
    assert [i.name for i in sweep_grid(old)] == ["sscs-fpn-dense-seed0", "sscs-fpn-agp-s0.5-seed0"]
    seeded = {**old, "sweep": {**old["sweep"], "seeds": [0, 1]}}
    assert len(sweep_grid(seeded)) == 4
    template_seed = {**old, "trial": {"seed": 5}}
    assert {i.seed for i in sweep_grid(template_seed)} == {5}
