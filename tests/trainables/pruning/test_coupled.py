"""Coupled-channel pruning: groups tie what must go together, the cut model equals the masked one,
scores sum over every coupled slice, and the global ranking removes the weights it aims at."""

import copy
import functools

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
from torch import nn

from trainables.pruning import coupled
from trainables.pruning.masks import prunable_parameters

ARCHS = ("Unet", "UnetPlusPlus", "FPN", "Linknet", "MAnet")
EXCLUDE = ("segmentation_head",)


def _model(arch: str, encoder: str = "resnet18", depth: int = 5) -> nn.Module:
    """Narrow decoders; FPN's GroupNorm(32, 64) makes units of two channels."""
    kw: dict = {"encoder_depth": depth}
    if arch in ("Unet", "UnetPlusPlus", "MAnet"):
        kw["decoder_channels"] = (32, 16, 16, 8, 8)[:depth]
    if arch == "MAnet":
        kw["decoder_pab_channels"] = 8
    if arch == "FPN":
        kw |= {"decoder_pyramid_channels": 32, "decoder_segmentation_channels": 64}
    return smp.create_model(arch, encoder_name=encoder, encoder_weights=None, classes=4, **kw)


@functools.cache
def _structure(arch: str, encoder: str = "resnet18", depth: int = 5) -> tuple[list, tuple]:
    """The coupled groups of `_model(...)` and the names of its counted weights (structure only:
    traced once per test module)."""
    graph = coupled.build_graph(_model(arch, encoder, depth))
    return coupled.groups_of(graph, EXCLUDE), tuple(coupled.counted_weights(graph, EXCLUDE))


def _groups(arch: str, encoder: str = "resnet18", depth: int = 5) -> list[coupled.CoupledGroup]:
    return _structure(arch, encoder, depth)[0]


def _randomise_norms(model: nn.Module) -> None:
    """Non-trivial norm statistics and affines, so a pruned channel carrying a constant shows."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            if isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen))


def _masked(model: nn.Module, groups: list, drop: float, seed: int = 0, alone: int = -1) -> dict:
    """Random units dropped (each group keeps its first; group `alone` keeps only that), masks
    applied; returns the masks."""
    gen = torch.Generator().manual_seed(seed)
    keeps = []
    for i, g in enumerate(groups):
        units = torch.rand(g.n_units, generator=gen) >= drop
        units[0] = True
        if i == alone:
            units[1:] = False
        keeps.append(units[g.units])
    params = coupled.group_parameters(model, groups)
    masks = coupled.param_masks(params, groups, keeps)
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)
    return masks


def _counted(model: nn.Module, names: tuple) -> int:
    return sum(model.get_parameter(n).numel() for n in names)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("encoder", "depth"), [("resnet18", 5), ("resnet50", 3)])
def test_slim_model_equals_masked_model_and_removes_the_counted_weights(
    arch: str, encoder: str, depth: int
) -> None:
    model = _model(arch, encoder, depth).eval()
    _randomise_norms(model)
    groups, counted = _structure(arch, encoder, depth)
    masks = _masked(model, groups, 0.5)
    counter = coupled.WeightCounter(groups, {n: model.get_parameter(n) for n in counted})
    expected_removed = counter.removed_fraction(coupled.keeps_from_masks(groups, masks))
    slim = coupled.slim(copy.deepcopy(model), masks, EXCLUDE)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, got = model(x), slim(x)
    assert got.shape == expected.shape and expected.shape[:2] == (1, 4)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    removed = 1 - _counted(slim, counted) / _counted(model, counted)
    assert removed == pytest.approx(expected_removed, abs=1e-12)
    assert 0.3 < removed < 0.9
    for m in slim.modules():  # every GroupNorm still divides its channels into equal groups
        if isinstance(m, nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0


@pytest.mark.parametrize("arch", ["FPN", "MAnet"])
def test_rebuild_from_structure_gives_the_slim_model(arch: str) -> None:
    """Group widths and the slim state dict (which carries MA-Net's kept attention channels)
    rebuild the slim model from a fresh one."""
    model = _model(arch, depth=3).eval()
    _randomise_norms(model)
    masks = _masked(model, _groups(arch, depth=3), 0.5, seed=3, alone=0)  # a group of one unit
    slim = coupled.slim(model, masks, EXCLUDE)
    counts = coupled.structure(slim, EXCLUDE)
    assert counts and all(isinstance(v, int) for v in counts.values())
    fresh = coupled.rebuild(_model(arch, depth=3), counts, EXCLUDE).eval()
    fresh.load_state_dict(slim.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), slim(x))
    if arch == "MAnet":
        assert isinstance(fresh.decoder.center, coupled.PrunedPABBlock)
        with pytest.raises(ValueError, match="lacks"):
            coupled.rebuild(_model(arch, depth=3), {"no.such.conv": 3}, EXCLUDE)
    else:  # GroupNorm units are two channels wide: an odd width cannot be rebuilt
        seg = next(g for g in _groups(arch, depth=3) if int(torch.bincount(g.units)[0]) == 2)
        with pytest.raises(ValueError, match="whole units"):
            coupled.rebuild(_model(arch, depth=3), {seg.name: 33}, EXCLUDE)


def test_groups_tie_residual_streams_skips_groupnorm_groups_and_attention() -> None:
    groups = {a: _groups(a, "resnet50", 3) for a in ("Unet", "FPN", "MAnet")}

    def owners(arch: str, param: str, dim: int) -> list:
        return [g for g in groups[arch] if any(s.param == param and s.dim == dim for s in g.slices)]

    (stream,) = owners("Unet", "encoder.layer1.0.conv3.weight", 0)  # a Bottleneck's output...
    tied = {(s.param, s.dim) for s in stream.slices}
    assert {  # ...is tied to the stream it adds to, its shortcut and every reader of it
        ("encoder.layer1.0.downsample.0.weight", 0),
        ("encoder.layer1.2.conv3.weight", 0),
        ("encoder.layer1.2.bn3.bias", 0),
        ("encoder.layer2.0.conv1.weight", 1),
        ("encoder.layer2.0.downsample.0.weight", 1),
    } <= tied
    # A decoder convolution reading a concatenation takes its input channels from two groups.
    assert len(owners("Unet", "decoder.blocks.1.conv1.0.weight", 1)) == 2
    # FPN: the four segmentation blocks' outputs are summed, in whole GroupNorm groups (of 2).
    (seg,) = owners("FPN", "decoder.seg_blocks.0.block.0.block.1.weight", 0)
    assert torch.bincount(seg.units).tolist() == [2] * 32
    # The class channels are never in a group; the head's inputs are.
    assert not owners("FPN", "segmentation_head.0.weight", 0)
    assert owners("FPN", "segmentation_head.0.weight", 1)
    # MA-Net: the attention block's inputs are prunable with the stream feeding it, its
    # internal channels are not.
    assert owners("MAnet", "decoder.center.bottom_conv.weight", 1)
    assert not owners("MAnet", "decoder.center.top_conv.weight", 0)
    assert not owners("MAnet", "decoder.center.bottom_conv.weight", 0)
    # Sparsity counts element pruning's weights that the forward pass uses: at depth 3 not the
    # encoder's unused stages, but the attention block's insides.
    counted = set(_structure("MAnet", "resnet50", 3)[1])
    every = set(prunable_parameters(_model("MAnet", "resnet50", 3), EXCLUDE))
    assert counted < every and "decoder.center.top_conv.weight" in counted
    assert {
        n for n in every - counted if not n.startswith(("encoder.layer3", "encoder.layer4"))
    } == set()


def test_a_units_score_of_ones_counts_the_parameters_its_cut_removes() -> None:
    """Scores sum over every coupled slice: with 1 per entry, a unit's score is exactly the
    number of parameters Torch-Pruning's surgery removes with it."""
    model = _model("FPN", depth=3).eval()
    groups = _groups("FPN", depth=3)
    params = coupled.group_parameters(model, groups)
    ones = {n: torch.ones_like(p) for n, p in params.items()}
    scores = coupled.unit_scores(groups, coupled.channel_scores(groups, ones))
    stem = next(i for i, g in enumerate(groups) if g.name == "encoder.conv1")
    seg = next(i for i, g in enumerate(groups) if int(torch.bincount(g.units)[0]) == 2)
    keeps = [torch.ones(g.channels, dtype=torch.bool) for g in groups]
    for i in (stem, seg):  # two groups with no parameter in common: unit 1 of each dropped
        keeps[i] = groups[i].units != 1
    slim = coupled.slim(copy.deepcopy(model), coupled.param_masks(params, groups, keeps), EXCLUDE)
    removed = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in slim.parameters())
    assert removed == int(scores[stem][1] + scores[seg][1])
    assert int(scores[seg][1]) == 2 * int(coupled.channel_scores(groups, ones)[seg][2])


def _count_removed(cost: list[torch.Tensor]):
    """A weight count where unit u of group i holds cost[i][u] weights."""
    total = float(sum(c.sum() for c in cost))
    return lambda keeps: float(sum(c[~k].sum() for c, k in zip(cost, keeps, strict=True))) / total


def test_global_selection_drops_the_lowest_normalised_units_closest_to_the_target() -> None:
    scores = [torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([10.0, 50.0, 40.0])]
    cost = [torch.ones(4), torch.ones(3)]
    ones = [torch.ones(4, dtype=torch.bool), torch.ones(3, dtype=torch.bool)]
    # Normalised by each group's mean: [1/3, 2/3, 1, 2] and [0.3, 1.5, 1.2].
    first = coupled.select_units(scores, ones, 3 / 7, _count_removed(cost))
    assert [k.tolist() for k in first] == [[False, False, True, True], [False, True, True]]
    # Later: dropped units stay dropped however they score now, and each group keeps its best.
    flipped = [torch.tensor([9.0, 9.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 5.0])]
    second = coupled.select_units(flipped, first, 0.99, _count_removed(cost))
    assert [k.tolist() for k in second] == [[False, False, False, True], [False, False, True]]
    # The closest reachable fraction, not the next one above: 2 of 7 weights for a target 0.3.
    third = coupled.select_units(scores, ones, 0.3, _count_removed(cost))
    assert sum(int((~k).sum()) for k in third) == 2


def test_layer_selection_drops_the_same_fraction_of_every_group() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = [torch.rand(n, generator=gen) for n in (8, 16, 32)]
    cost = [torch.full((8,), 5.0), torch.ones(16), torch.full((32,), 2.0)]
    ones = [torch.ones(len(s), dtype=torch.bool) for s in scores]
    keeps = coupled.select_units(scores, ones, 0.5, _count_removed(cost), scope="layer")
    assert [int((~k).sum()) for k in keeps] == [4, 8, 16]
    for s, k in zip(scores, keeps, strict=True):  # the lowest-scoring half of each group
        assert s[~k].max() < s[k].min()


class _Residual(nn.Module):
    """conv1 -> BN -> ReLU, then a residual conv2 -> BN added back, then a 1x1 head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.conv2, self.bn2 = nn.Conv2d(12, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.head = nn.Conv2d(12, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn1(self.conv1(x)))
        return self.head(torch.relu(a + self.bn2(self.conv2(a))))


def _ranks(v: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(v)).astype(float)


def test_taylor_score_sums_g_w_over_every_coupled_slice_and_ranks_like_the_loss_change() -> None:
    torch.manual_seed(0)
    net = _Residual().eval()
    _randomise_norms(net)
    (group,) = coupled.find_groups(net, ("head",))  # the residual stream, read by conv2 and head
    x, y = torch.randn(8, 3, 8, 8), torch.randn(8, 2, 8, 8)
    loss = nn.functional.mse_loss(net(x), y)
    loss.backward()
    params = coupled.group_parameters(net, [group])
    gw = {n: (p.grad * p.detach()).abs() for n, p in params.items()}
    (score,) = coupled.channel_scores([group], gw)

    def gw_of(t: torch.Tensor) -> torch.Tensor:
        return (t.grad * t).abs().detach()

    c1, c2, h = net.conv1, net.conv2, net.head
    by_hand = (  # |g w| of everything channel c touches: conv2 both reads and writes it
        gw_of(c1.weight).sum(dim=(1, 2, 3))
        + gw_of(c2.weight).sum(dim=(1, 2, 3))
        + gw_of(c2.weight).sum(dim=(0, 2, 3))
        + gw_of(h.weight).sum(dim=(0, 2, 3))
        + sum(gw_of(t) for t in (c1.bias, c2.bias, net.bn1.weight, net.bn1.bias))
        + gw_of(net.bn2.weight)
        + gw_of(net.bn2.bias)
    )
    torch.testing.assert_close(score, by_hand)
    change = []
    with torch.no_grad():
        for c in range(group.channels):
            keep = torch.arange(group.channels) != c
            pruned = copy.deepcopy(net)
            mine = coupled.group_parameters(pruned, [group])
            for name, mask in coupled.param_masks(mine, [group], [keep]).items():
                mine[name].mul_(mask)
            change.append(abs(nn.functional.mse_loss(pruned(x), y).item() - loss.item()))
    rho = np.corrcoef(_ranks(score.numpy()), _ranks(np.array(change)))[0, 1]
    assert rho > 0.8, rho
