"""Channel surgery a trial itself uses: the slim deployable model, its channel structure, a rebuild.

Two structured granularities: `channel` (channels that only one convolution reads,
`channels.py`) and `coupled` (every channel, tied channels together, `coupled.py`).
"""

from __future__ import annotations

import torch
from torch import nn

from trainables.config import STRUCTURED, TrialConfig
from trainables.models import build_model
from trainables.pruning import channels


def slim(model: nn.Module, cfg: TrialConfig, masks: dict[str, torch.Tensor] | None) -> nn.Module:
    """The deployable model: a channel-pruned one with its dropped channels cut out (in place);
    any other model as it is."""
    granularity = cfg.pruning.granularity
    if granularity not in STRUCTURED or not masks:
        return model
    if granularity == "coupled":
        from trainables.pruning import coupled

        return coupled.slim(model, masks, cfg.pruning.exclude)
    groups = channels.find_groups(model, cfg.pruning.exclude)
    return channels.shrink(model, groups, channels.keeps_from_masks(model, groups, masks))


def channel_structure(model: nn.Module, cfg: TrialConfig) -> dict[str, int]:
    """Channels per prunable group as the model has them now: what rebuilds a slim model."""
    granularity = cfg.pruning.granularity
    if granularity == "coupled":
        from trainables.pruning import coupled

        return coupled.structure(model, cfg.pruning.exclude)
    if granularity != "channel":
        return {}
    return {g.producer: g.channels for g in channels.find_groups(model, cfg.pruning.exclude)}


def rebuild(cfg: TrialConfig, structure: dict[str, int]) -> nn.Module:
    """An untrained model of the stored architecture, slim where `structure` says so."""
    model = build_model(cfg.model, cfg.data.classes)
    if not structure:
        return model
    if cfg.pruning.granularity == "coupled":
        from trainables.pruning import coupled

        return coupled.rebuild(model, structure, cfg.pruning.exclude)
    channels.reshape_to(model, structure, cfg.pruning.exclude)
    return model
