"""The gradual pruner: accumulates importance, updates masks on schedule, keeps them in force."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trainables.config import PruningConfig
from trainables.errors import UserError
from trainables.pruning import channels, importance, schedules
from trainables.pruning.masks import MaskSet, global_masks, layer_masks, prunable_parameters

ACCUMULATING = ("lp", "agp", "mp")


class Pruner:
    """LP / AGP (Taylor), movement and magnitude pruning of one model through the prune stage.

    The training loop owns the counters and calls: `after_backward()` each prune-stage step,
    `masks.mask_gradients()` before and `after_step(optimizer)` after each optimizer step,
    `end_of_epoch(epoch)` after each prune-stage epoch, `freeze()` before fine-tuning.

    Granularity `element` masks single weights; `channel` masks whole channel groups
    (`channels.find_groups`), scored per channel, so that `channels.shrink` can cut them out.
    """

    def __init__(
        self, cfg: PruningConfig, model: nn.Module, *, prune_epochs: int, iters_per_epoch: int
    ) -> None:
        self.cfg = cfg
        self.prune_epochs = prune_epochs
        self.iters_per_epoch = iters_per_epoch
        self.model = model
        self.groups: list[channels.ChannelGroup] = []
        if cfg.granularity == "channel":
            self.groups = channels.find_groups(model, cfg.exclude)
            if not self.groups:
                raise UserError(
                    f"pruning.granularity 'channel': model {type(model).__name__} has no channel "
                    "that only one convolution reads; use granularity 'element'"
                )
            self.slices = {g.producer: channels.group_slices(model, g) for g in self.groups}
            self.consumers = {g.producer: channels.consumer_slice(model, g) for g in self.groups}
            self.masks = MaskSet(channels.group_parameters(model, self.groups))
        else:
            self.masks = MaskSet(prunable_parameters(model, cfg.exclude))
        self.scores = self._fresh_scores() if cfg.pruner in ACCUMULATING else {}
        self.frozen = False

    def _fresh_scores(self) -> dict[str, torch.Tensor]:
        if self.groups:
            device = next(iter(self.masks.params.values())).device
            return {g.producer: torch.zeros(g.channels, device=device) for g in self.groups}
        return {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.masks.params.items()}

    # ---- schedule (pure in the epoch) ---------------------------------------------------------

    def interval(self) -> int:
        return max(self.prune_epochs // max(self.cfg.steps, 1), 1)

    def target_sparsity(self, epoch: int) -> float:
        """The schedule's sparsity in force after `epoch` (1-based) of the prune stage."""
        c = self.cfg
        if c.pruner == "mp":
            it = epoch * self.iters_per_epoch
            return schedules.cubic_sparsity(
                it,
                total=self.prune_epochs * self.iters_per_epoch,
                warmup=c.mp_warmup_epochs * self.iters_per_epoch,
                cooldown=c.mp_cooldown_epochs * self.iters_per_epoch,
                initial=c.initial_sparsity,
                final=c.sparsity,
            )
        k = epoch // self.interval()
        if k == 0:
            return 0.0
        schedule = schedules.linear_sparsity if c.pruner == "lp" else schedules.agp_sparsity
        return schedule(k, c.steps, c.initial_sparsity, c.sparsity)

    def _is_update_epoch(self, epoch: int) -> bool:
        if self.cfg.pruner == "mp":
            return self.target_sparsity(epoch) > self.target_sparsity(epoch - 1)  # on the ramp
        return epoch % self.interval() == 0 and epoch // self.interval() <= self.cfg.steps

    # ---- the loop's hooks ---------------------------------------------------------------------

    @torch.no_grad()
    def after_backward(self) -> None:
        """Accumulate this step's importance on the masked weights (no host synchronisation)."""
        if self.frozen or not self.scores:
            return
        if self.groups:
            for g in self.groups:
                gw = channels.channel_gw(*self.consumers[g.producer])  # (channels,)
                if self.cfg.pruner == "mp":
                    self.scores[g.producer].sub_(gw)  # movement: -sum g w
                else:
                    self.scores[g.producer].add_(gw.pow(2))  # group Taylor: (sum g w)^2
            return
        names = [n for n, p in self.masks.params.items() if p.grad is not None]
        weights = [self.masks.params[n].detach() for n in names]
        grads = [self.masks.params[n].grad for n in names]
        if self.cfg.pruner == "mp":
            steps = importance.movement_scores(weights, grads)
        else:
            steps = importance.taylor_scores(weights, grads)
        torch._foreach_add_([self.scores[n] for n in names], steps)

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.masks.apply()
        self.masks.zero_momentum(optimizer)

    def end_of_epoch(self, epoch: int) -> bool:
        """Update masks if the schedule says so after this epoch; True if they changed."""
        if self.frozen or not self._is_update_epoch(epoch):
            return False
        ranking = self._ranking_scores()
        target = self.target_sparsity(epoch)
        if self.groups:
            keeps = self.channel_keeps()
            new = {
                g.producer: channels.channel_keep(ranking[g.producer], keeps[g.producer], target)
                for g in self.groups
            }
            self.masks.update(channels.param_masks(self.model, self.groups, new))
        else:
            compute = global_masks if self.cfg.scope == "global" else layer_masks
            self.masks.update(compute(ranking, self.masks.masks, target))
        if self.cfg.pruner in ("lp", "agp"):  # Taylor: a fresh estimate for the next interval
            for s in self.scores.values():
                s.zero_()
        return True

    def _ranking_scores(self) -> dict[str, torch.Tensor]:
        if self.cfg.pruner == "magnitude" and self.groups:
            return {n: channels.channel_magnitude(s).cpu() for n, s in self.slices.items()}
        if self.cfg.pruner == "magnitude":
            return {n: importance.magnitude_score(p.detach()) for n, p in self.masks.params.items()}
        if self.groups:
            return {n: s.cpu() for n, s in self.scores.items()}
        return self.scores

    def channel_keeps(self) -> dict[str, torch.Tensor]:
        """Channel granularity: which channels of each group are kept, (channels,) bool on CPU."""
        return channels.keeps_from_masks(self.model, self.groups, self.masks.masks)

    def achieved_sparsity(self) -> float:
        """Fraction of prunable weights (element) or prunable channels (channel) removed."""
        if not self.groups:
            return self.masks.sparsity()
        keeps = self.channel_keeps()
        total = sum(k.numel() for k in keeps.values())
        return 1.0 - sum(int(k.sum()) for k in keeps.values()) / max(total, 1)

    def freeze(self) -> None:
        """Masks fixed from here on (fine-tuning); accumulators released."""
        self.frozen = True
        self.scores = {}

    # ---- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": self.masks.state_dict(),
            "scores": {n: s.cpu() for n, s in self.scores.items()},
            "frozen": self.frozen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks.load_state_dict(state["masks"])
        self.frozen = bool(state["frozen"])
        device = {n: p.device for n, p in self.masks.params.items()}
        self.scores = {n: s.to(device[n]) for n, s in state["scores"].items()}
