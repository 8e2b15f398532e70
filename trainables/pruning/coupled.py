"""Coupled-channel pruning: channels tied by residual additions, concatenations, GroupNorm groups and
attention blocks go together (Torch-Pruning's DepGraph), masked while training, cut out at the end.

A coupled group is every parameter slice that one channel of a feature map touches, found by
tracing the model: the convolution(s) that write it, the norms on the way, and every convolution
that reads it, through additions (a ResNet's residual stream, Linknet's and FPN's skips), stacks
and concatenations (Unet's skips, with their offsets). A group's channels are pruned in units: one
channel, or a whole GroupNorm group (FPN's decoder), so that every GroupNorm left normalises exactly
the channels it did before and its `num_groups` still divides its channels.

Never pruned: the model's output (class) channels, the image input, and the output channels of
modules under the `exclude` prefixes (their input channels still shrink with their producers).

MA-Net's position attention (`PABBlock`) reshapes (N, HW, C) to (N, C, H, W), mixing channels with
positions, which DepGraph cannot follow. It is traced as one opaque node with its own pruner: its
output channels are `out_conv`'s, and its input channels (the encoder's deepest residual stream)
are cut from the four convolutions that read them while the attention map keeps all its channels
and only the kept ones are added back (`PrunedPABBlock`). Its internal channels stay dense.

Sparsity means what `pruning.sparsity` means for element pruning: the fraction of prunable
weights (conv and linear weights outside `exclude` that the forward pass uses) removed. Units are
scored over every coupled slice, ranked (across groups, or within each group for the same
fraction of every group, or a fraction in proportion to a weight per group: its stage's ratio,
`stage_of`), and the number dropped is searched so that the removed fraction, counted exactly
(`WeightCounter`), is the closest to the target.

While training, pruned channels are masked (every slice zeroed), so shapes, optimizer state and
checkpoints are unchanged; `slim` then cuts them out with Torch-Pruning and gives the same outputs.
"""

from __future__ import annotations

import contextlib
import math
import re
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import torch_pruning as tp
from segmentation_models_pytorch.decoders.manet.decoder import PABBlock
from torch import nn

from trainables.pruning.masks import PRUNABLE_TYPES

EXAMPLE_SIZE = 64  # px of the tracing input: structure only, and every smp model accepts 64


# ---- modules Torch-Pruning needs help with ------------------------------------------------------


class PrunedPABBlock(PABBlock):
    """MA-Net's position attention with input channels removed: the attention map is computed on
    all `in_channels` of `bottom_conv` (its reshape mixes channels and positions) and only the
    channels in `residual_keep` are added to the input, exactly what the masked block computes."""

    residual_keep: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_size, _, height, width = x.shape
        x_top = self.top_conv(x).flatten(2)  # (N, P, HW)
        x_center = self.center_conv(x).flatten(2).transpose(1, 2)  # (N, HW, P)
        x_bottom = self.bottom_conv(x).flatten(2).transpose(1, 2)  # (N, HW, C)
        sp_map = torch.matmul(x_center, x_top)  # (N, HW, HW)
        sp_map = self.map_softmax(sp_map.view(batch_size, -1))
        sp_map = sp_map.view(batch_size, height * width, height * width)
        sp_map = torch.matmul(sp_map, x_bottom)  # (N, HW, C)
        sp_map = sp_map.reshape(batch_size, self.in_channels, height, width)  # (N, C, H, W)
        x = x + sp_map.index_select(1, self.residual_keep)  # (N, C', H, W)
        return self.out_conv(x)


class _PABPruner(tp.pruner.function.BasePruningFunc):
    """A position attention block as one node: out = `out_conv`'s outputs, in = its input."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        tp.prune_conv_out_channels(layer.out_conv, list(idxs))
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        for conv in (layer.top_conv, layer.center_conv, layer.bottom_conv, layer.out_conv):
            tp.prune_conv_in_channels(conv, list(idxs))
        keep = getattr(layer, "residual_keep", None)
        if keep is None:
            keep = torch.arange(layer.in_channels, device=layer.out_conv.weight.device)
        dropped = torch.zeros(len(keep), dtype=torch.bool, device=keep.device)
        dropped[list(idxs)] = True
        if isinstance(layer, PrunedPABBlock):
            layer.residual_keep = keep[~dropped]
        else:
            layer.__class__ = PrunedPABBlock  # same parameters, a forward that honours the cut
            layer.register_buffer("residual_keep", keep[~dropped])  # in the state dict
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.out_conv.out_channels

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.out_conv.in_channels


class _WholeGroupNormPruner(tp.pruner.function.GroupNormPruner):
    """GroupNorm loses whole groups only, and `num_groups` follows (Torch-Pruning keeps it)."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        size = layer.num_channels // layer.num_groups
        groups = {i // size for i in idxs}
        if len(set(idxs)) != len(groups) * size:
            raise ValueError(f"GroupNorm channels {sorted(idxs)[:8]}... are not whole groups")
        super().prune_out_channels(layer, idxs)
        layer.num_groups -= len(groups)
        return layer

    prune_in_channels = prune_out_channels


_PAB_PRUNER = _PABPruner()
CUSTOM_PRUNERS = {
    nn.GroupNorm: _WholeGroupNormPruner(),
    PABBlock: _PAB_PRUNER,
    PrunedPABBlock: _PAB_PRUNER,
}


def _pab_trace_forward(self: PABBlock, x: torch.Tensor) -> torch.Tensor:
    """The block as one convolution from its input to its output: one traced node."""
    conv = self.out_conv
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)


@contextlib.contextmanager
def opaque_attention(model: nn.Module) -> Iterator[None]:
    """While tracing, MA-Net's attention blocks run as one convolution each."""
    blocks = [m for m in model.modules() if isinstance(m, PABBlock)]
    for block in blocks:
        block.forward = types.MethodType(_pab_trace_forward, block)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def build_graph(model: nn.Module, example_size: int = EXAMPLE_SIZE) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of `model`, traced in eval mode (the mode is restored)."""
    param = next(model.parameters())
    in_channels = getattr(getattr(model, "encoder", None), "_in_channels", 3)
    example = torch.zeros(
        1, in_channels, example_size, example_size, device=param.device, dtype=param.dtype
    )
    training = model.training
    try:
        with opaque_attention(model), torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=example, customized_pruners=CUSTOM_PRUNERS, verbose=False
            )
    finally:
        model.train(training)
    if graph.unwrapped_parameters:
        names = [graph._param_to_name[p] for p, _ in graph.unwrapped_parameters]
        raise ValueError(f"parameters outside known modules cannot be cut: {names[:3]}")
    return graph


# ---- groups -------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Slice:
    """Entries `local` along `dim` of parameter `param` carry the group's channels `root`."""

    param: str
    dim: int
    local: torch.Tensor  # (n,) int64
    root: torch.Tensor  # (n,) int64


@dataclass(frozen=True, eq=False)
class CoupledGroup:
    """Channels that go together, named by the module whose output channels root them.

    `units[c]` is the pruning unit of channel c (0..n_units-1): channels of one GroupNorm group
    share a unit. `slices[0]` is the root module's weight along its output dim."""

    name: str
    channels: int
    units: torch.Tensor  # (channels,) int64
    slices: tuple[Slice, ...]

    @property
    def n_units(self) -> int:
        return int(self.units.max()) + 1

    def to(self, device: torch.device | str) -> CoupledGroup:
        slices = tuple(
            replace(s, local=s.local.to(device), root=s.root.to(device)) for s in self.slices
        )
        return replace(self, units=self.units.to(device), slices=slices)


def _param_dims(module: nn.Module, out: bool) -> list[tuple[str, int]] | None:
    """(parameter path in `module`, dim) that one of its output (`out`) or input channels
    occupies; None for a parametrised module this file does not know how to cut."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        if module.groups != 1:
            return None
        transposed = isinstance(module, nn.ConvTranspose2d)
        if not out:
            return [("weight", 0 if transposed else 1)]
        return [("weight", 1 if transposed else 0)] + (
            [("bias", 0)] if module.bias is not None else []
        )
    if isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
        return [("weight", 0), ("bias", 0)] if module.affine else []
    if isinstance(module, PABBlock):
        if out:
            return [("out_conv.weight", 0)] + (
                [("out_conv.bias", 0)] if module.out_conv.bias is not None else []
            )
        return [
            (f"{conv}.weight", 1) for conv in ("top_conv", "center_conv", "bottom_conv", "out_conv")
        ]
    if isinstance(module, nn.Module) and next(module.parameters(), None) is None:
        return []  # additions, concatenations, activations, the traced ops
    return None


def _units(channels: int, tied: list[torch.Tensor]) -> torch.Tensor:
    """(channels,) unit ids: channels in one tied set share a unit (union-find), numbered in order."""
    parent = list(range(channels))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for members in tied:
        first = find(int(members[0]))
        for m in members[1:].tolist():
            parent[find(m)] = first
    labels: dict[int, int] = {}
    return torch.tensor([labels.setdefault(find(c), len(labels)) for c in range(channels)])


def _under(name: str | None, prefixes: Sequence[str]) -> bool:
    return name is not None and any(name.startswith(p) for p in prefixes)


def _coupled_group(graph: tp.DependencyGraph, group, exclude: Sequence[str]) -> CoupledGroup | None:
    """Torch-Pruning's group as slices and units; None when it must stay whole."""
    slices, tied = [], []
    for item in group:
        module, handler = item.dep.target.module, item.dep.handler
        name = graph._module2name.get(module)
        out = graph.is_out_channel_pruning_fn(handler)
        dims = _param_dims(module, out)
        if isinstance(module, tp.ops._OutputOp) or dims is None or (out and _under(name, exclude)):
            return None  # the class channels, an unknown layer, or an excluded module's outputs
        if any(r is None for r in item.root_idxs):
            return None
        local = torch.tensor(item.idxs, dtype=torch.long)
        root = torch.tensor(item.root_idxs, dtype=torch.long)
        for attr, dim in dims:
            slices.append(Slice(f"{name}.{attr}", dim, local, root))
        if isinstance(module, nn.GroupNorm):
            gid = local // (module.num_channels // module.num_groups)
            tied += [root[gid == g] for g in gid.unique()]
    channels = len(group[0].idxs)
    name = graph._module2name[group[0].dep.target.module]
    return CoupledGroup(name, channels, _units(channels, tied), tuple(slices))


ROOT_TYPES = (nn.Conv2d, nn.ConvTranspose2d, PABBlock)


def groups_of(
    graph: tp.DependencyGraph, exclude: Sequence[str] = (), *, single: bool = False
) -> list[CoupledGroup]:
    """Every prunable coupled group of the graph's model, in trace order; with `single`, also
    those down to one unit (a slim model's, which `structure` must still name)."""
    found = (
        _coupled_group(graph, g, exclude)
        for g in graph.get_all_groups(root_module_types=ROOT_TYPES)
    )
    return [g for g in found if g is not None and (single or g.n_units > 1)]


def find_groups(
    model: nn.Module, exclude: Sequence[str] = (), example_size: int = EXAMPLE_SIZE
) -> list[CoupledGroup]:
    """Every prunable coupled group of `model`, in trace order."""
    return groups_of(build_graph(model, example_size), exclude)


def counted_weights(
    graph: tp.DependencyGraph, exclude: Sequence[str] = ()
) -> dict[str, nn.Parameter]:
    """The weights sparsity counts: those element pruning ranks (conv and linear weights outside
    `exclude`) that the forward pass uses (an smp encoder of depth 3 keeps unused stages)."""
    used = set(graph.module2node)
    for node in graph.module2node:  # opaque blocks (attention): their insides too
        if isinstance(node, PABBlock):
            used |= set(node.modules())
    return {
        f"{name}.weight": m.weight
        for name, m in graph.model.named_modules()
        if m in used and isinstance(m, PRUNABLE_TYPES) and not _under(name, exclude)
    }


def group_parameters(model: nn.Module, groups: Sequence[CoupledGroup]) -> dict[str, nn.Parameter]:
    """Every parameter that coupled masks touch, by name."""
    return {s.param: model.get_parameter(s.param) for g in groups for s in g.slices}


# ---- stages -------------------------------------------------------------------------------------

# A stage container in an encoder's module path: ResNet's `layer3` (smp's own encoders and timm's
# `tu-` ones), timm's `stages.2` / `stages_2` (features_only flattens dots) and `blocks.2`.
_STAGE = re.compile(r"(?:^|\.)(?:layer\d+|(?:stages|blocks)[._]\d+)(?=\.|$)")
STEM = "encoder.stem"


def stage_of(name: str) -> str:
    """The stage of the module `name` (a coupled group's root): under `encoder`, its path up to
    and including its stage container ("encoder.layer3", "encoder.model.layer2"), "encoder.stem"
    outside any (the stem before the first stage); elsewhere its first component ("decoder")."""
    first = name.split(".", 1)[0]
    if first != "encoder":
        return first
    match = _STAGE.search(name, len(first))
    return name[: match.end()] if match else STEM


def stages(groups: Sequence[CoupledGroup]) -> list[str]:
    """The stages of `groups`, in their order, each once."""
    return list(dict.fromkeys(stage_of(g.name) for g in groups))


def model_stages(
    model: nn.Module, exclude: Sequence[str] = (), example_size: int = EXAMPLE_SIZE
) -> list[str]:
    """The stages of `model`'s prunable coupled groups, in module order (the encoder's stem and
    stages, then the decoder; trace order varies with the architecture): the names
    `pruning.stage_ratios` takes."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    groups = find_groups(model, exclude, example_size)
    return stages(sorted(groups, key=lambda g: order[g.name]))


def stage_weights(groups: Sequence[CoupledGroup], ratios: Mapping[str, float]) -> list[float]:
    """Per group, its stage's ratio (1.0 for a stage `ratios` does not name): the `weights` of
    `select_units`. ValueError for a name that is not one of the groups' stages."""
    known = stages(groups)
    unknown = [name for name in ratios if name not in known]
    if unknown:
        raise ValueError(
            f"{', '.join(map(repr, unknown))} not among this model's stages: {', '.join(known)}"
        )
    return [float(ratios.get(stage_of(g.name), 1.0)) for g in groups]


# ---- scores -------------------------------------------------------------------------------------


def _per_channel(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over every dimension but `dim`: (size of dim,)."""
    others = [d for d in range(t.dim()) if d != dim]
    return t.sum(dim=others) if others else t


def channel_scores(
    groups: Sequence[CoupledGroup], elementwise: dict[str, torch.Tensor]
) -> list[torch.Tensor]:
    """Per group, (channels,) float32: `elementwise` (one tensor per parameter, such as w^2 or
    |g w|) summed over every slice of every coupled parameter. A missing tensor counts zero."""
    sums: dict[tuple[str, int], torch.Tensor] = {}
    out = []
    for g in groups:
        score = torch.zeros(g.channels, device=g.units.device)
        for s in g.slices:
            if s.param not in elementwise:
                continue
            key = (s.param, s.dim)
            if key not in sums:
                sums[key] = _per_channel(elementwise[s.param].float(), s.dim)
            score.index_add_(0, s.root, sums[key][s.local])
        out.append(score)
    return out


def unit_scores(
    groups: Sequence[CoupledGroup], scores: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Channel scores summed into units: per group (n_units,)."""
    return [
        torch.zeros(g.n_units, device=s.device).index_add_(0, g.units.to(s.device), s.float())
        for g, s in zip(groups, scores, strict=True)
    ]


def unit_keeps(groups: Sequence[CoupledGroup], keeps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Channel keeps as unit keeps (a unit's channels are kept or dropped together)."""
    out = []
    for g, k in zip(groups, keeps, strict=True):
        units = torch.zeros(g.n_units, dtype=torch.bool)
        units[g.units.cpu()[k.cpu()]] = True
        out.append(units)
    return out


def channel_keeps(
    groups: Sequence[CoupledGroup], units: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Unit keeps as channel keeps, (channels,) bool on CPU."""
    return [u.cpu()[g.units.cpu()] for g, u in zip(groups, units, strict=True)]


# ---- how many weights a choice removes ----------------------------------------------------------


class WeightCounter:
    """Exact count of the entries of `counted` (for sparsity, `counted_weights`) that channel
    keeps remove: a tensor keeps the product of its kept sizes along each dimension (output and
    input channels, kernel), so no masks need building to count."""

    def __init__(self, groups: Sequence[CoupledGroup], counted: dict[str, nn.Parameter]) -> None:
        self.shapes = {n: tuple(p.shape) for n, p in counted.items()}
        self.total = sum(p.numel() for p in counted.values())
        self.cuts = [  # (param, dim, group index, root channels of its entries)
            (s.param, s.dim, i, s.root.cpu())
            for i, g in enumerate(groups)
            for s in g.slices
            if s.param in self.shapes
        ]

    def removed_fraction(self, keeps: Sequence[torch.Tensor]) -> float:
        """Fraction of counted weights removed by the channel keeps (bool, on CPU)."""
        lost: dict[str, list[int]] = {}
        for param, dim, i, root in self.cuts:
            sizes = lost.setdefault(param, [0] * len(self.shapes[param]))
            sizes[dim] += int((~keeps[i][root]).sum())
        kept = self.total
        for param, removed in lost.items():
            shape = self.shapes[param]
            left = math.prod(s - r for s, r in zip(shape, removed, strict=True))
            kept -= math.prod(shape) - left
        return 1.0 - kept / max(self.total, 1)


def _ranked(score: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(n_units,) scores divided by their mean magnitude over the kept units (Torch-Pruning's
    'mean' normaliser, so that groups of different sizes and scales rank together); dropped
    units at -inf."""
    score, keep = score.float().cpu(), keep.cpu()
    scale = score[keep].abs().mean().clamp_min(1e-30) if keep.any() else torch.tensor(1.0)
    return torch.where(keep, score / scale, torch.full_like(score, float("-inf")))


def _global_plan(ranked: list[torch.Tensor]) -> tuple[int, int, Callable[[int], list]]:
    """Drop the k lowest units of one ranking across groups, each group's best left out."""
    entries = []  # (score, group, unit)
    for i, r in enumerate(ranked):
        best = int(torch.argmax(r))
        entries += [(v, i, u) for u, v in enumerate(r.tolist()) if u != best]
    entries.sort(key=lambda e: e[0])  # stable: ties keep group and unit order

    def plan(k: int) -> list[torch.Tensor]:
        keeps = [torch.ones(len(r), dtype=torch.bool) for r in ranked]
        for _, i, u in entries[:k]:
            keeps[i][u] = False
        return keeps

    dropped = sum(1 for e in entries if e[0] == float("-inf"))
    return dropped, len(entries), plan


def _layer_plan(
    ranked: list[torch.Tensor], weights: Sequence[float] | None = None
) -> tuple[int, int, Callable[[int], list]]:
    """Drop the fraction (k / steps) * weight / max(weights) of every group's units (its lowest;
    without weights, the same fraction of each), at least the ones already dropped, at most all
    but one."""
    orders = [torch.argsort(r, stable=True) for r in ranked]
    already = [int(torch.isinf(r).sum()) for r in ranked]
    steps = max(len(r) for r in ranked)
    if weights is None:
        scales = [1.0] * len(ranked)
    else:
        finite = all(math.isfinite(w) and w >= 0 for w in weights)
        if len(weights) != len(ranked) or not finite or max(weights) <= 0:
            raise ValueError(
                f"weights {list(weights)[:4]}...: one per group, finite, >= 0, one > 0"
            )
        scales = [w / max(weights) for w in weights]

    def plan(k: int) -> list[torch.Tensor]:
        keeps = []
        for r, order, done, scale in zip(ranked, orders, already, scales, strict=True):
            n = min(max(done, round(k * len(r) * scale / steps)), len(r) - 1)
            keep = torch.ones(len(r), dtype=torch.bool)
            keep[order[:n]] = False
            keeps.append(keep)
        return keeps

    return 0, steps, plan


def select_units(
    scores: Sequence[torch.Tensor],
    keeps: Sequence[torch.Tensor],
    target: float,
    removed_fraction: Callable[[list[torch.Tensor]], float],
    scope: str = "global",
    weights: Sequence[float] | None = None,
) -> list[torch.Tensor]:
    """New unit keeps (per group, (n_units,) bool) removing the fraction of weights closest to
    `target`, as `removed_fraction(unit keeps)` counts it.

    scope "global": one ranking of every group's units (scores normalised per group);
    "layer": every group drops the same fraction of its units, or with `weights` (per group,
    >= 0: `stage_weights`) a fraction in proportion to its weight (weight 0: none). Dropped
    units stay dropped (masks only shrink) and every group keeps at least one unit."""
    ranked = [_ranked(s, k) for s, k in zip(scores, keeps, strict=True)]
    if scope == "global":
        if weights is not None:
            raise ValueError("weights per group need scope 'layer'")
        lo, hi, plan = _global_plan(ranked)
    else:
        lo, hi, plan = _layer_plan(ranked, weights)
    start = lo
    while lo < hi:  # the smallest k removing at least `target`: removal only grows with k
        mid = (lo + hi) // 2
        if removed_fraction(plan(mid)) >= target:
            hi = mid
        else:
            lo = mid + 1
    if lo > start:  # or one step less, if that is closer
        above, below = removed_fraction(plan(lo)), removed_fraction(plan(lo - 1))
        lo -= int(target - below < above - target)
    return plan(lo)


# ---- masks --------------------------------------------------------------------------------------


def param_masks(
    params: dict[str, torch.Tensor], groups: Sequence[CoupledGroup], keeps: Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Element masks of every coupled parameter from the channel keeps (AND where a parameter
    belongs to several groups: a convolution's outputs to one, its inputs to another)."""
    masks: dict[str, torch.Tensor] = {}
    for g, keep in zip(groups, keeps, strict=True):
        for s in g.slices:
            p = params[s.param]
            line = torch.ones(p.shape[s.dim], dtype=torch.bool, device=p.device)
            line[s.local.to(p.device)] = keep.to(p.device)[s.root.to(p.device)]
            shape = [1] * p.dim()
            shape[s.dim] = -1
            m = line.view(shape).expand_as(p)
            masks[s.param] = masks[s.param] & m if s.param in masks else m.clone()
    return masks


def keeps_from_masks(
    groups: Sequence[CoupledGroup], masks: dict[str, torch.Tensor]
) -> list[torch.Tensor]:
    """Channel keeps read back from element masks: a channel is kept if its root filter is."""
    keeps = []
    for g in groups:
        s = g.slices[0]
        m = masks[s.param]
        others = [d for d in range(m.dim()) if d != s.dim]
        line = m.any(dim=others) if others else m  # (size of dim,)
        keep = torch.zeros(g.channels, dtype=torch.bool)
        keep[s.root.cpu()] = line.cpu()[s.local.cpu()]
        keeps.append(keep)
    return keeps


# ---- surgery ------------------------------------------------------------------------------------


@torch.no_grad()
def _cut(
    graph: tp.DependencyGraph, groups: Sequence[CoupledGroup], drops: Sequence[torch.Tensor]
) -> None:
    model = graph.model
    for g, drop in zip(groups, drops, strict=True):
        idxs = torch.nonzero(drop.cpu()).flatten().tolist()
        if not idxs:
            continue
        root = model.get_submodule(g.name)
        handler = graph.get_pruner_of_module(root).prune_out_channels
        graph.get_pruning_group(root, handler, idxs).prune(record_history=False)


def slim(
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    exclude: Sequence[str] = (),
    example_size: int = EXAMPLE_SIZE,
) -> nn.Module:
    """Cut the masked channels out of `model`, in place: physically smaller layers whose outputs
    equal the masked model's. `exclude` must be what the masks were made with."""
    graph = build_graph(model, example_size)
    groups = groups_of(graph, exclude)
    keeps = keeps_from_masks(groups, masks)
    _cut(graph, groups, [~k for k in keeps])
    return model


def structure(
    model: nn.Module, exclude: Sequence[str] = (), example_size: int = EXAMPLE_SIZE
) -> dict[str, int]:
    """Channels per coupled group as `model` has them now (dense or slim): all a loader needs,
    with the slim state dict, to rebuild it (`rebuild`)."""
    groups = groups_of(build_graph(model, example_size), exclude, single=True)
    return {g.name: g.channels for g in groups}


def rebuild(
    model: nn.Module,
    counts: dict[str, int],
    exclude: Sequence[str] = (),
    example_size: int = EXAMPLE_SIZE,
) -> nn.Module:
    """Give a freshly built model the slim structure `counts` (from `structure`), in place, ready
    for the slim state dict: each group keeps its first units."""
    graph = build_graph(model, example_size)
    groups = [g for g in groups_of(graph, exclude) if g.name in counts]
    unknown = set(counts) - {g.name for g in groups}
    if unknown:
        raise ValueError(f"coupled structure names groups this model lacks: {sorted(unknown)[:3]}")
    drops = []
    for g in groups:
        sizes = torch.bincount(g.units)  # channels per unit
        kept_units = int(torch.searchsorted(sizes.cumsum(0), counts[g.name], right=True))
        if int(sizes[:kept_units].sum()) != counts[g.name] or kept_units == 0:
            raise ValueError(f"group {g.name}: {counts[g.name]} channels are not whole units")
        drops.append(g.units >= kept_units)
    _cut(graph, groups, drops)
    return model
