"""A pruner and its model through a checkpoint round trip, as a resumed trial gets them."""

import io
from collections.abc import Callable

import torch
from torch import nn

from trainables.config import PruningConfig
from trainables.pruning.pruner import Pruner


def restored(
    model: nn.Module,
    pruner: Pruner,
    cfg: PruningConfig,
    make_model: Callable[[], nn.Module],
    *,
    prune_epochs: int,
    iters_per_epoch: int,
) -> tuple[nn.Module, Pruner]:
    """A fresh model and pruner loaded from `model`'s and `pruner`'s saved state."""
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "pruner": pruner.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh_model = make_model()
    fresh_model.load_state_dict(state["model"])
    fresh = Pruner(cfg, fresh_model, prune_epochs=prune_epochs, iters_per_epoch=iters_per_epoch)
    fresh.load_state_dict(state["pruner"])
    return fresh_model, fresh
