"""Per-stage ratios of coupled layer pruning: equal ratios are the layer scope, a stage at ratio 0
keeps every channel while the target is still met, fractions follow the ratios, masks only
shrink, stage names come from the real smp and timm module names, and the config checks them."""

import copy
import json
import math

import pytest
import segmentation_models_pytorch as smp
import torch
import yaml
from torch import nn

from sweep.config import parse_set
from tests.trainables.pruning.test_pruner_coupled import _model  # the same small Unet
from trainables.config import PruningConfig, TrialConfig, merge
from trainables.errors import UserError
from trainables.pruning import coupled
from trainables.pruning.pruner import Pruner

# `_model`'s stages: ResNet-18's stem (with layer1's residual stream, which its conv1 writes),
# layer1 and layer2 (their block convolutions; layer2 also its residual stream) and the decoder.
STAGES = ["encoder.stem", "encoder.layer1", "encoder.layer2", "decoder"]


def _pruned(
    model: nn.Module,
    sparsity: float,
    ratios: dict | None,
    updates: int = 1,
    seen: list | None = None,
) -> Pruner:
    """A magnitude pruner after its first `updates` mask updates (of two), a few SGD steps before
    each so that the ranking moves between them; the channel keeps after each go to `seen`."""
    cfg = PruningConfig(
        pruner="magnitude", sparsity=sparsity, steps=2, granularity="coupled", stage_ratios=ratios
    )
    pruner = Pruner(cfg, model, prune_epochs=2, iters_per_epoch=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(1, updates + 1):
        for _ in range(2):
            x = torch.randn(2, 3, 32, 32, generator=gen)
            y = torch.randint(0, 4, (2, 32, 32), generator=gen)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            pruner.masks.mask_gradients()
            opt.step()
            pruner.after_step(opt)
        assert pruner.end_of_epoch(epoch)
        if seen is not None:
            seen.append(pruner.channel_keeps())
    return pruner


def _dropped(pruner: Pruner) -> dict[str, list[float]]:
    """Per stage, the fraction of channels each of its groups dropped."""
    out: dict[str, list[float]] = {}
    for name, keep in pruner.channel_keeps().items():
        out.setdefault(coupled.stage_of(name), []).append(1.0 - keep.float().mean().item())
    return out


def test_equal_ratios_give_exactly_the_layer_scope_masks() -> None:
    """Any equal ratios, or naming only some stages at 1.0 (the rest default to it)."""
    model = _model()
    plain = _pruned(copy.deepcopy(model), 0.5, None, updates=2)
    for ratios in ({s: 2.5 for s in STAGES}, {"decoder": 1.0}):
        staged = _pruned(copy.deepcopy(model), 0.5, ratios, updates=2)
        assert staged.masks.masks.keys() == plain.masks.masks.keys()
        for name, mask in plain.masks.masks.items():
            assert torch.equal(staged.masks.masks[name], mask), name


def test_a_stage_at_ratio_zero_keeps_every_channel_and_the_target_is_still_met() -> None:
    """... and the second update only drops more, though the ranking moved in between."""
    seen: list[dict] = []
    pruner = _pruned(_model(), 0.5, {"encoder.stem": 0.0, "decoder": 1.0}, updates=2, seen=seen)
    assert pruner.achieved_sparsity() == pytest.approx(0.5, abs=0.01)
    first, second = seen
    assert all(not (second[n] & ~k).any() for n, k in first.items())
    assert sum(int(k.sum()) for k in second.values()) < sum(int(k.sum()) for k in first.values())
    dropped = _dropped(pruner)
    assert dropped["encoder.stem"] == [0.0]
    assert all(f > 0.3 for s in STAGES[1:] for f in dropped[s])


def test_an_unreachable_target_gets_the_closest_the_ratios_allow() -> None:
    """Only the decoder may shrink: each of its groups keeps one channel, the encoder all."""
    ratios = {s: 0.0 for s in STAGES[:-1]} | {"decoder": 1.0}
    pruner = _pruned(_model(), 0.9, ratios, updates=2)
    keeps = pruner.channel_keeps()
    for name, keep in keeps.items():
        assert int(keep.sum()) == (1 if name.startswith("decoder") else len(keep)), name
    assert 0.0 < pruner.achieved_sparsity() < 0.9


def test_fractions_dropped_follow_the_stage_ratios() -> None:
    """layer2 at 1.0 and layer1 at 0.25: every layer1 group drops a quarter of the fraction a
    layer2 group drops (to one unit of 64), and the target is met."""
    pruner = _pruned(_model(), 0.4, {"encoder.layer1": 0.25, "encoder.layer2": 1.0}, updates=2)
    assert pruner.achieved_sparsity() == pytest.approx(0.4, abs=0.01)
    dropped = _dropped(pruner)
    deep = dropped["encoder.layer2"]
    assert max(deep) - min(deep) < 1e-9 and deep[0] > 0.2
    for f in dropped["encoder.layer1"]:
        assert abs(f - 0.25 * deep[0]) <= 1 / 64 and f < deep[0]


def test_masks_only_shrink_when_ratios_change_between_updates() -> None:
    """What is dropped stays dropped, also in a group whose weight falls to 0; no group empties."""
    gen = torch.Generator().manual_seed(0)
    sizes = (8, 16, 32)

    def removed(units: list[torch.Tensor]) -> float:
        return sum(int((~u).sum()) for u in units) / sum(sizes)

    keeps = [torch.ones(n, dtype=torch.bool) for n in sizes]
    history = []
    for weights, target in (([1.0, 1.0, 1.0], 0.3), ([0.0, 1.0, 2.0], 0.6), ([1, 0, 1], 0.8)):
        scores = [torch.rand(n, generator=gen) for n in sizes]
        new = coupled.select_units(scores, keeps, target, removed, "layer", weights)
        for old, k in zip(keeps, new, strict=True):
            assert not (k & ~old).any() and k.any()
        history.append(removed(new))
        keeps = new
    assert history == sorted(history) and history[-1] > 0.6


def test_weights_are_for_the_layer_scope_only() -> None:
    scores, keeps = [torch.rand(4)], [torch.ones(4, dtype=torch.bool)]
    with pytest.raises(ValueError, match="scope 'layer'"):
        coupled.select_units(scores, keeps, 0.5, lambda u: 0.0, "global", [1.0])


def test_unknown_stage_names_are_an_error_listing_the_models_stages() -> None:
    """layer4 is built but never run at encoder depth 3: not a stage of this model."""
    cfg = PruningConfig(
        pruner="agp", sparsity=0.5, granularity="coupled", stage_ratios={"encoder.layer4": 1.0}
    )
    with pytest.raises(UserError, match=r"pruning\.stage_ratios: 'encoder\.layer4' not among") as e:
        Pruner(cfg, _model(), prune_epochs=5, iters_per_epoch=1)
    assert all(s in str(e.value) for s in STAGES)
    scoped = PruningConfig(
        pruner="agp", sparsity=0.5, granularity="coupled", scope="global", stage_ratios={}
    )
    with pytest.raises(UserError, match=r"pruning\.stage_ratios need pruning\.scope 'layer'"):
        Pruner(scoped, _model(), prune_epochs=5, iters_per_epoch=1)


SMP_RESNET = {
    "encoder.conv1": "encoder.stem",
    "encoder.layer1.1.conv1": "encoder.layer1",
    "encoder.layer2.0.downsample.0": "encoder.layer2",
    "encoder.layer3.0.conv1": "encoder.layer3",
    "decoder.p5": "decoder",
    "decoder.seg_blocks.0.block.0.block.0": "decoder",
}
TIMM_RESNET = {
    "encoder.model.conv1.0": "encoder.stem",
    "encoder.model.conv1.6": "encoder.stem",
    "encoder.model.layer1.0.conv1": "encoder.model.layer1",
    "encoder.model.layer2.0.downsample.1": "encoder.model.layer2",
    "decoder.blocks.0.conv1.0": "decoder",
}


@pytest.mark.parametrize(
    ("arch", "encoder", "stages", "names"),
    [
        ("FPN", "resnet18", [f"encoder.layer{i}" for i in range(1, 5)], SMP_RESNET),
        ("Unet", "tu-test_resnet", ["encoder.model.layer1", "encoder.model.layer2"], TIMM_RESNET),
    ],
)
def test_stages_of_real_smp_and_timm_models(
    arch: str, encoder: str, stages: list[str], names: dict[str, str]
) -> None:
    """smp's own ResNet names its stages `encoder.layerN`, timm's `tu-` one
    `encoder.model.layerN`; their stem convolutions are the stem; the decoder is one stage."""
    depth = 5 if arch == "FPN" else 3
    kw = {"decoder_channels": (16, 8, 8)} if arch == "Unet" else {}
    model = smp.create_model(
        arch, encoder_name=encoder, encoder_weights=None, encoder_depth=depth, classes=4, **kw
    )
    expected = ["encoder.stem", *stages, "decoder"]
    assert coupled.model_stages(model, ("segmentation_head",)) == expected
    modules = dict(model.named_modules())
    for name, stage in names.items():
        assert name in modules and coupled.stage_of(name) == stage, name


def test_stage_of_other_timm_stage_containers() -> None:
    assert coupled.stage_of("encoder.model.stages_2.blocks.1.conv") == "encoder.model.stages_2"
    assert coupled.stage_of("encoder.model.stages.0.downsample") == "encoder.model.stages.0"
    assert coupled.stage_of("encoder.model.blocks.3.0.conv_pw") == "encoder.model.blocks.3"
    assert coupled.stage_of("encoder.model.conv_stem") == "encoder.stem"
    assert coupled.stage_of("segmentation_head.0") == "segmentation_head"


# ---- config -------------------------------------------------------------------------------------

COUPLED = {"pruner": "agp", "sparsity": 0.5, "granularity": "coupled"}


def test_config_reads_ratios_and_round_trips_through_yaml_json_and_replace() -> None:
    ratios = {"encoder.layer1": 0.5, "decoder": "2", "encoder.stem": 0}
    cfg = TrialConfig.from_dict({"pruning": {**COUPLED, "stage_ratios": ratios}})
    assert cfg.pruning.stage_ratios == {"encoder.layer1": 0.5, "decoder": 2.0, "encoder.stem": 0.0}
    for dump, load in ((yaml.safe_dump, yaml.safe_load), (json.dumps, json.loads)):
        assert TrialConfig.from_dict(load(dump(cfg.to_dict()))) == cfg
    assert cfg.replace(pruning={"sparsity": 0.7}).pruning.stage_ratios == cfg.pruning.stage_ratios
    assert TrialConfig.from_dict({}).pruning.stage_ratios is None
    assert len({cfg, cfg.replace(pruning={"sparsity": 0.7})}) == 2  # configs stay hashable


def test_set_flags_name_a_stage_through_its_dots() -> None:
    """`--set pruning.stage_ratios.encoder.layer1=0` nests the stage name's dots; they are read
    back as one name."""
    flags = parse_set(["pruning.stage_ratios.encoder.layer1=0", "pruning.stage_ratios.decoder=1"])
    cfg = TrialConfig.from_dict(merge({"pruning": COUPLED}, flags))
    assert cfg.pruning.stage_ratios == {"encoder.layer1": 0.0, "decoder": 1.0}


@pytest.mark.parametrize(
    ("pruning", "pattern"),
    [
        (
            {"granularity": "element"},
            r"'pruning\.stage_ratios'.*granularity 'element'.*need pruning\.granularity 'coupled' "
            r"and pruning\.scope 'layer'",
        ),
        ({"scope": "global"}, r"'pruning\.stage_ratios'.*pruning\.scope 'global'"),
        (
            {"stage_ratios": {"decoder": -1}},
            r"'pruning\.stage_ratios\.decoder' is -1\.0.*0 or more",
        ),
        ({"stage_ratios": {"decoder": "nan"}}, r"'pruning\.stage_ratios\.decoder' is nan"),
        ({"stage_ratios": {"decoder": 0, "encoder.stem": 0}}, r"at least one ratio above 0"),
        ({"stage_ratios": {}}, r"at least one ratio above 0"),
        ({"stage_ratios": {"decoder": "wide"}}, r"'pruning\.stage_ratios\.decoder' must be a num"),
        ({"stage_ratios": [0.5]}, r"'pruning\.stage_ratios' must be a mapping"),
    ],
)
def test_config_rejects_bad_ratios_naming_the_key(pruning: dict, pattern: str) -> None:
    config = {"pruning": {**COUPLED, "stage_ratios": {"decoder": 1.0}, **pruning}}
    with pytest.raises(UserError, match=pattern):
        TrialConfig.from_dict(config)


def test_a_dense_trial_ignores_ratios_made_for_its_pruned_trials() -> None:
    """A sweep's dense base shares the template's pruning section but not its granularity."""
    cfg = TrialConfig.from_dict({"pruning": {"stage_ratios": {"decoder": 0.5}}})
    assert not cfg.pruned and math.isclose(cfg.pruning.stage_ratios["decoder"], 0.5)
