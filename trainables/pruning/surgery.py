"""Channel surgery a trial itself uses: the slim model, its channel structure, a rebuild, the cut.

Two structured granularities: `channel` (channels that only one convolution reads,
`channels.py`) and `coupled` (every channel, tied channels together, `coupled.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class Cut:
    """A pruned model cut slim before fine-tuning: its channel structure (what `rebuild` needs)
    and what the full-size model it was cut from counted, which its sparsity stays relative to.
    A checkpoint of a slim model stores it (`to_dict`) under the key "slim"."""

    structure: dict[str, int]
    achieved_sparsity: float  # the pruner's at the cut (masks are fixed from there on)
    prunable_params: int  # the full-size model's
    total_params: int  # the full-size model's
    fp32_bytes: int  # the full-size model's floating-point tensors (parameters and buffers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Cut:
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(state, dict) or set(state) != names:
            keys = sorted(state) if isinstance(state, dict) else state
            raise ValueError(f"slim model record has keys {keys}; expected {sorted(names)}")
        return cls(**state)

    def sparsity_stats(self, model: nn.Module) -> dict[str, float | int]:
        """`masks.sparsity_stats` of the full-size model, from the slim `model`: the cut removed
        only masked entries (zeros), so the non-zeros are the same."""
        nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
        return {
            "achieved_sparsity": self.achieved_sparsity,
            "overall_sparsity": 1.0 - nonzero / max(self.total_params, 1),
            "nonzero_params": nonzero,
            "total_params": self.total_params,
            "prunable_params": self.prunable_params,
        }


def load_slim(
    cfg: TrialConfig, record: dict[str, Any], state: dict[str, torch.Tensor]
) -> tuple[nn.Module, Cut]:
    """The slim model a checkpoint holds (its "slim" `record` and model `state`), built without
    fetching encoder weights; ValueError when they do not fit `cfg`'s architecture."""
    cut = Cut.from_dict(record)
    model = rebuild(cfg.replace(model={"encoder_weights": None}), cut.structure)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(str(err).strip().splitlines()[0]) from None
    return model, cut
