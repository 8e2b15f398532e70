"""Channel pruning: groups found in all five architectures, exact surgery, channel masks hold."""

import copy

import pytest
import segmentation_models_pytorch as smp
import torch
from torch import nn

from trainables.config import PruningConfig
from trainables.pruning import channels
from trainables.pruning.pruner import Pruner

ARCHS = ("Unet", "UnetPlusPlus", "FPN", "Linknet", "MAnet")


def _model(arch: str, encoder: str = "tu-test_resnet") -> nn.Module:
    return smp.create_model(arch, encoder_name=encoder, encoder_weights=None, classes=4)


def _randomise_norms(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics, so a channel carrying a constant would show."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen))


def _masked_and_shrunk(model: nn.Module, sparsity: float) -> tuple[nn.Module, nn.Module, dict]:
    groups = channels.find_groups(model, ("segmentation_head",))
    gen = torch.Generator().manual_seed(0)
    ones = {g.producer: torch.ones(g.channels, dtype=torch.bool) for g in groups}
    keeps = {
        g.producer: channels.channel_keep(
            torch.rand(g.channels, generator=gen), ones[g.producer], sparsity
        )
        for g in groups
    }
    with torch.no_grad():
        for name, mask in channels.param_masks(model, groups, keeps).items():
            model.get_parameter(name).mul_(mask)
    return model, channels.shrink(copy.deepcopy(model), groups, keeps), keeps


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("encoder", ["tu-test_resnet", "resnet18"])
def test_shrunk_model_equals_masked_model_and_is_smaller(arch: str, encoder: str) -> None:
    model = _model(arch, encoder).eval()
    _randomise_norms(model)
    masked, slim, _ = _masked_and_shrunk(model, 0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, got = masked(x), slim(x)
    assert got.shape == expected.shape == (2, 4, 32, 32)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    dense = sum(p.numel() for p in masked.parameters())
    assert sum(p.numel() for p in slim.parameters()) < dense


def test_groups_cover_bottlenecks_and_every_decoder_kind() -> None:
    """ResNet-50-style Bottlenecks give two groups each; the decoders' chains are found; the
    segmentation head, FPN's GroupNorm blocks and MA-Net's attention are left whole."""
    with torch.device("meta"):  # the structure is all that counts: no weights to initialise
        models = {a: _model(a, "resnet50") for a in ARCHS}
    groups = {a: channels.find_groups(m, ("segmentation_head",)) for a, m in models.items()}
    fpn = [g.producer for g in groups["FPN"]]
    assert len(fpn) == 2 * (3 + 4 + 6 + 3) and all(p.startswith("encoder.") for p in fpn)
    assert "encoder.layer1.0.conv2" in fpn  # the second group of a Bottleneck
    names = {a: {g.producer for g in gs} for a, gs in groups.items()}
    assert "decoder.blocks.0.conv1.0" in names["Unet"]
    assert "decoder.blocks.x_0_0.conv1.0" in names["UnetPlusPlus"]
    assert {"decoder.blocks.0.block.0.0", "decoder.blocks.0.block.1.0"} <= names["Linknet"]
    assert {"decoder.blocks.0.hl_conv.0.0", "decoder.blocks.0.SE_hl.1"} <= names["MAnet"]
    for gs in groups.values():
        assert not any(
            n.startswith("segmentation_head") or "pab" in n
            for g in gs
            for n in (g.producer, g.consumer)
        )


def test_channel_keep_exact_counts_never_empty_and_only_shrinks() -> None:
    score = torch.tensor([5.0, 1.0, 3.0, 4.0, 2.0])
    keep = channels.channel_keep(score, torch.ones(5, dtype=torch.bool), 0.4)
    assert keep.tolist() == [True, False, True, True, False]
    again = channels.channel_keep(torch.tensor([0.0, 9.0, 9.0, 1.0, 9.0]), keep, 0.6)
    assert again.tolist() == [False, False, True, True, False]  # dropped ones stay dropped
    assert int(channels.channel_keep(score, keep, 0.99).sum()) == 1


def test_channel_gw_is_the_loss_change_of_removing_each_channel() -> None:
    """With a loss linear in the consumer's output, zeroing channel c changes it by exactly
    -channel_gw[c] (what the Taylor and movement scores are built on)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 1)
    ).eval()
    x, probe = torch.randn(4, 3, 8, 8), torch.randn(4, 2, 8, 8)
    (group,) = channels.find_groups(net)
    assert (group.producer, group.norm, group.consumer) == ("0", "1", "3")
    (net(x) * probe).mean().backward()
    gw = channels.channel_gw(*channels.consumer_slice(net, group))
    assert gw.abs().min() > 0
    with torch.no_grad():
        base = (net(x) * probe).mean()
        for c in range(6):
            pruned = copy.deepcopy(net)
            keep = torch.arange(6) != c
            for name, mask in channels.param_masks(pruned, [group], {"0": keep}).items():
                pruned.get_parameter(name).mul_(mask)
            change = (pruned(x) * probe).mean() - base
            assert float(change) == pytest.approx(-float(gw[c]), rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("pruner", ["agp", "mp", "magnitude"])
def test_channel_pruner_reaches_target_and_masks_hold_through_sgd(pruner: str) -> None:
    model = _model("Unet")
    cfg = PruningConfig(
        pruner=pruner,
        sparsity=0.5,
        steps=2,
        granularity="channel",
        mp_warmup_epochs=0,
        mp_cooldown_epochs=0,
    )
    p = Pruner(cfg, model, prune_epochs=2, iters_per_epoch=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
    for epoch in (1, 2):
        for _ in range(2):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            p.after_backward()
            p.masks.mask_gradients()
            opt.step()
            p.after_step(opt)
        assert p.end_of_epoch(epoch)
    keeps = p.channel_keeps()
    for g in p.groups:
        assert int((~keeps[g.producer]).sum()) == min(round(0.5 * g.channels), g.channels - 1)
    assert p.achieved_sparsity() == pytest.approx(0.5, abs=0.05)
    for _ in range(3):  # fine-tuning: momentum and weight decay must not regrow pruned channels
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        p.masks.mask_gradients()
        opt.step()
        p.after_step(opt)
    g = p.groups[0]
    dropped = ~keeps[g.producer]
    assert torch.all(model.get_submodule(g.producer).weight[dropped] == 0)
    if g.norm:
        assert torch.all(model.get_submodule(g.norm).bias[dropped] == 0)


def test_reshape_to_rebuilds_the_slim_structure_from_counts() -> None:
    model = _model("Linknet").eval()
    _, slim, keeps = _masked_and_shrunk(model, 0.5)
    counts = channels.kept_counts(keeps)
    assert all(0 < counts[n] < k.numel() for n, k in keeps.items())
    fresh = channels.reshape_to(_model("Linknet"), counts, ("segmentation_head",))
    fresh.load_state_dict(slim.state_dict())  # shapes match exactly
    with pytest.raises(ValueError, match="lacks"):
        channels.reshape_to(_model("Linknet"), {"no.such.conv": 3})
