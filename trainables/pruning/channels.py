"""Channel (structured) pruning: which channels can go, channel importance, masks and surgery.

A channel group is one convolution's output channel that flows, through per-channel operations
only (BatchNorm, ReLU, identity), into exactly one other convolution: the inner channels of
ResNet blocks, of the decoders' conv-conv pairs, of Linknet's 1x1 / transposed / 1x1 chain and of
MA-Net's squeeze-excitation and high-level convolutions. Such a channel has no other reader, so
removing it needs no dependency graph: skip connections, concatenations, residual additions and
MA-Net's position attention keep every channel they see, and all five architectures stay intact.

Pruning a channel zeroes its producer filter (and bias), its BatchNorm scale and shift, and the
consumer's input slice; the channel then carries exactly zero, so `shrink` can cut it out of the
tensors and give the same outputs from physically smaller convolutions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import segmentation_models_pytorch.decoders.manet.decoder as manet_decoder
import segmentation_models_pytorch.decoders.unet.decoder as unet_decoder
import segmentation_models_pytorch.decoders.unetplusplus.decoder as unetpp_decoder
import timm.models.resnet as timm_resnet
import torch
import torchvision.models.resnet as tv_resnet
from torch import nn

from trainables.pruning.masks import keep_top

CONVS = (nn.Conv2d, nn.ConvTranspose2d)
# Per-channel modules with f(0) = 0 that may sit between a producer and its consumer.
PASS_THROUGH = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.Identity, nn.Dropout2d)

# Blocks whose forward chains producer -> norm -> (act) -> consumer on named attributes
# (read from each library's forward). Paths are relative to the block.
BLOCK_CHAINS: dict[type, tuple[tuple[str, str | None, str], ...]] = {
    tv_resnet.BasicBlock: (("conv1", "bn1", "conv2"),),
    tv_resnet.Bottleneck: (("conv1", "bn1", "conv2"), ("conv2", "bn2", "conv3")),
    timm_resnet.BasicBlock: (("conv1", "bn1", "conv2"),),
    timm_resnet.Bottleneck: (("conv1", "bn1", "conv2"), ("conv2", "bn2", "conv3")),
    unet_decoder.UnetDecoderBlock: (("conv1.0", "conv1.1", "conv2.0"),),
    unetpp_decoder.DecoderBlock: (("conv1.0", "conv1.1", "conv2.0"),),
    manet_decoder.DecoderBlock: (("conv1.0", "conv1.1", "conv2.0"),),
    manet_decoder.MFABBlock: (("conv1.0", "conv1.1", "conv2.0"),),
}


@dataclass(frozen=True)
class ChannelGroup:
    """The output channels of `producer` read only by `consumer` (module names in the model)."""

    producer: str
    norm: str | None
    consumer: str
    channels: int


def _out_dim(conv: nn.Module) -> int:
    return 1 if isinstance(conv, nn.ConvTranspose2d) else 0


def _in_dim(conv: nn.Module) -> int:
    return 0 if isinstance(conv, nn.ConvTranspose2d) else 1


def _valid(model: nn.Module, producer: str, norm: str | None, consumer: str) -> bool:
    """Plain (ungrouped) convolutions with a BatchNorm or nothing between them."""
    prod, cons = model.get_submodule(producer), model.get_submodule(consumer)
    if not (isinstance(prod, CONVS) and isinstance(cons, CONVS)):
        return False
    if prod.groups != 1 or cons.groups != 1:
        return False
    if norm is not None and type(model.get_submodule(norm)) is not nn.BatchNorm2d:
        return False  # GroupNorm, LayerNorm, InPlaceABN: channels are not independent
    return prod.weight.shape[_out_dim(prod)] == cons.weight.shape[_in_dim(cons)]


def _flatten(seq: nn.Sequential, prefix: str) -> list[tuple[str, nn.Module]]:
    leaves = []
    for name, child in seq.named_children():
        path = f"{prefix}.{name}" if prefix else name
        leaves += _flatten(child, path) if isinstance(child, nn.Sequential) else [(path, child)]
    return leaves


def _sequential_chains(seq: nn.Sequential, prefix: str) -> list[tuple[str, str | None, str]]:
    """conv -> [BatchNorm] -> [pass-through...] -> conv runs inside one (nested) Sequential."""
    leaves = _flatten(seq, prefix)
    chains = []
    for i, (name, module) in enumerate(leaves):
        if not isinstance(module, CONVS):
            continue
        norm = None
        for later_name, later in leaves[i + 1 :]:
            if isinstance(later, CONVS):
                chains.append((name, norm, later_name))
                break
            if not isinstance(later, PASS_THROUGH):
                break
            if isinstance(later, nn.BatchNorm2d):
                if norm is not None:
                    break
                norm = later_name
    return chains


def find_groups(model: nn.Module, exclude: Sequence[str] = ()) -> list[ChannelGroup]:
    """Every prunable channel group of `model`, in module order, none inside `exclude` prefixes."""
    chains: list[tuple[str, str | None, str]] = []
    modules = dict(model.named_modules())
    for name, module in modules.items():
        prefix = f"{name}." if name else ""
        for producer, norm, consumer in BLOCK_CHAINS.get(type(module), ()):
            try:
                chain = (prefix + producer, prefix + norm if norm else None, prefix + consumer)
                model.get_submodule(chain[0]), model.get_submodule(chain[2])
            except AttributeError:
                continue  # an optional layer this instance does not have (Unet++ empty blocks)
            chains.append(chain)
        parent = modules[name.rpartition(".")[0]] if name else None
        if isinstance(module, nn.Sequential) and not isinstance(parent, nn.Sequential):
            chains += _sequential_chains(module, name)  # nested Sequentials are flattened in
    groups, seen = [], set()
    for producer, norm, consumer in chains:
        if producer in seen or any(n.startswith(p) for p in exclude for n in (producer, consumer)):
            continue
        if _valid(model, producer, norm, consumer):
            seen.add(producer)
            conv = model.get_submodule(producer)
            groups.append(ChannelGroup(producer, norm, consumer, conv.weight.shape[_out_dim(conv)]))
    return groups


Slices = list[tuple[str, nn.Parameter, int]]


def group_slices(model: nn.Module, group: ChannelGroup) -> Slices:
    """(parameter name, parameter, channel dim) of everything that belongs to the group."""
    prod = model.get_submodule(group.producer)
    cons = model.get_submodule(group.consumer)
    out = [(f"{group.producer}.weight", prod.weight, _out_dim(prod))]
    if prod.bias is not None:
        out.append((f"{group.producer}.bias", prod.bias, 0))
    if group.norm is not None:
        norm = model.get_submodule(group.norm)
        if norm.affine:
            out += [(f"{group.norm}.weight", norm.weight, 0), (f"{group.norm}.bias", norm.bias, 0)]
    out.append((f"{group.consumer}.weight", cons.weight, _in_dim(cons)))
    return out


def group_parameters(model: nn.Module, groups: Sequence[ChannelGroup]) -> dict[str, nn.Parameter]:
    """Every parameter that channel masks touch, by name."""
    return {name: p for g in groups for name, p, _ in group_slices(model, g)}


def _per_channel(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over every dimension but `dim`: (channels,)."""
    others = [d for d in range(t.dim()) if d != dim]
    return t.sum(dim=others) if others else t  # sum(dim=[]) would sum everything


def consumer_slice(model: nn.Module, group: ChannelGroup) -> tuple[nn.Parameter, int]:
    """The consumer's weight and its input-channel dim."""
    cons = model.get_submodule(group.consumer)
    return cons.weight, _in_dim(cons)


def channel_gw(weight: nn.Parameter, dim: int) -> torch.Tensor:
    """sum of g * w over each channel's slice of the consumer's weight, (channels,).

    The consumer is linear in its input, so this is sum over positions of dL/da * a for the
    channel's activation a: removing the channel (a -> 0) changes the loss by about minus this.
    Its square is the group Taylor score (Molchanov 2019), its negated sum the movement score."""
    if weight.grad is None:
        return torch.zeros(weight.shape[dim], device=weight.device)
    return _per_channel((weight.grad * weight.detach()).float(), dim)


def channel_magnitude(slices: Slices) -> torch.Tensor:
    """L2 norm of each channel's parameters, (channels,)."""
    squares = [_per_channel(p.detach().float().pow(2), dim) for _, p, dim in slices]
    return torch.stack(squares).sum(0).sqrt()


def channel_keep(score: torch.Tensor, keep: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean (channels,): round(sparsity * n) lowest-scoring channels dropped, at least one kept,
    already-dropped channels first."""
    n = score.numel()
    ranked = torch.where(
        keep, score.float(), torch.full_like(score, float("-inf"), dtype=torch.float)
    )
    return keep_top(ranked, min(round(sparsity * n), n - 1))


def param_masks(
    model: nn.Module, groups: Sequence[ChannelGroup], keeps: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Element masks for every group parameter from the channel keeps (AND where groups share
    a convolution: a Bottleneck's conv2 consumes one group and produces the next)."""
    masks: dict[str, torch.Tensor] = {}
    for g in groups:
        keep = keeps[g.producer]
        for name, p, dim in group_slices(model, g):
            shape = [1] * p.dim()
            shape[dim] = g.channels
            m = keep.view(shape).to(p.device).expand_as(p)
            masks[name] = masks[name] & m if name in masks else m.clone()
    return masks


def keeps_from_masks(
    model: nn.Module, groups: Sequence[ChannelGroup], masks: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Channel keeps read back from element masks: a channel is kept if its filter is."""
    keeps = {}
    for g in groups:
        prod = model.get_submodule(g.producer)
        dim = _out_dim(prod)
        keeps[g.producer] = _per_channel(masks[f"{g.producer}.weight"].float(), dim).cpu() > 0
    return keeps


def _cut(module: nn.Module, attr: str, index: torch.Tensor, dim: int) -> None:
    tensor = getattr(module, attr)
    if tensor is None:
        return
    cut = tensor.detach().index_select(dim, index.to(tensor.device)).clone()
    if isinstance(tensor, nn.Parameter):
        setattr(module, attr, nn.Parameter(cut, requires_grad=tensor.requires_grad))
    else:
        setattr(module, attr, cut)


@torch.no_grad()
def shrink(
    model: nn.Module, groups: Sequence[ChannelGroup], keeps: dict[str, torch.Tensor]
) -> nn.Module:
    """Cut the dropped channels out of the tensors, in place: physically smaller convolutions.

    Outputs are unchanged when the dropped channels carry zero (masks applied)."""
    for g in groups:
        index = torch.nonzero(keeps[g.producer].cpu()).flatten()
        prod = model.get_submodule(g.producer)
        _cut(prod, "weight", index, _out_dim(prod))
        _cut(prod, "bias", index, 0)
        prod.out_channels = len(index)
        if g.norm is not None:
            norm = model.get_submodule(g.norm)
            for attr in ("weight", "bias", "running_mean", "running_var"):
                _cut(norm, attr, index, 0)
            norm.num_features = len(index)
        cons = model.get_submodule(g.consumer)
        _cut(cons, "weight", index, _in_dim(cons))
        cons.in_channels = len(index)
    return model


def kept_counts(keeps: dict[str, torch.Tensor]) -> dict[str, int]:
    """The slim model's structure: channels kept per producer (all a loader needs to rebuild it)."""
    return {name: int(k.sum()) for name, k in keeps.items()}


def reshape_to(model: nn.Module, counts: dict[str, int], exclude: Sequence[str] = ()) -> nn.Module:
    """Give a freshly built model the slim structure `counts`, ready for the slim state dict."""
    groups = [g for g in find_groups(model, exclude) if g.producer in counts]
    unknown = set(counts) - {g.producer for g in groups}
    if unknown:
        raise ValueError(f"channel structure names layers this model lacks: {sorted(unknown)[:3]}")
    keeps = {g.producer: torch.arange(g.channels) < counts[g.producer] for g in groups}
    return shrink(model, groups, keeps)
