"""The gradual pruner: accumulates importance, updates masks on schedule, keeps them in force."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from trainables.config import PruningConfig
from trainables.errors import UserError
from trainables.pruning import channels, coupled, importance, schedules
from trainables.pruning.masks import MaskSet, global_masks, layer_masks, prunable_parameters

ACCUMULATING = ("lp", "agp", "mp")


class Granularity(Protocol):
    """What is pruned: the masks it keeps in force, how scores are kept and masks recomputed."""

    masks: MaskSet

    def fresh_scores(self) -> dict[str, torch.Tensor]: ...

    def accumulate(self, scores: dict[str, torch.Tensor], movement: bool) -> None: ...

    def magnitude(self) -> dict[str, torch.Tensor]: ...

    def new_masks(self, ranking: dict[str, torch.Tensor], target: float) -> dict[str, torch.Tensor]:
        """Masks removing `target` of what `achieved_sparsity` counts, dropped entries first."""
        ...

    def achieved_sparsity(self) -> float: ...


class ElementGranularity:
    """Single weights of conv and linear layers, ranked per layer or globally."""

    def __init__(self, cfg: PruningConfig, model: nn.Module) -> None:
        self.scope = cfg.scope
        self.masks = MaskSet(prunable_parameters(model, cfg.exclude))

    def fresh_scores(self) -> dict[str, torch.Tensor]:
        return {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.masks.params.items()}

    def accumulate(self, scores: dict[str, torch.Tensor], movement: bool) -> None:
        names = [n for n, p in self.masks.params.items() if p.grad is not None]
        weights = [self.masks.params[n].detach() for n in names]
        grads = [self.masks.params[n].grad for n in names]
        score = importance.movement_scores if movement else importance.taylor_scores
        torch._foreach_add_([scores[n] for n in names], score(weights, grads))

    def magnitude(self) -> dict[str, torch.Tensor]:
        return {n: importance.magnitude_score(p.detach()) for n, p in self.masks.params.items()}

    def new_masks(self, ranking: dict[str, torch.Tensor], target: float) -> dict[str, torch.Tensor]:
        compute = global_masks if self.scope == "global" else layer_masks
        return compute(ranking, self.masks.masks, target)

    def achieved_sparsity(self) -> float:
        """Fraction of prunable weights set to zero."""
        return self.masks.sparsity()


class ChannelGranularity:
    """Channels that exactly one convolution reads (`channels.find_groups`), each group pruned to
    the same fraction, scored per channel."""

    def __init__(self, cfg: PruningConfig, model: nn.Module) -> None:
        self.model = model
        self.groups = channels.find_groups(model, cfg.exclude)
        if not self.groups:
            raise UserError(
                f"pruning.granularity 'channel': model {type(model).__name__} has no channel "
                "that only one convolution reads; use granularity 'element' or 'coupled'"
            )
        self.slices = {g.producer: channels.group_slices(model, g) for g in self.groups}
        self.consumers = {g.producer: channels.consumer_slice(model, g) for g in self.groups}
        self.masks = MaskSet(channels.group_parameters(model, self.groups))

    def fresh_scores(self) -> dict[str, torch.Tensor]:
        device = next(iter(self.masks.params.values())).device
        return {g.producer: torch.zeros(g.channels, device=device) for g in self.groups}

    def accumulate(self, scores: dict[str, torch.Tensor], movement: bool) -> None:
        for g in self.groups:
            gw = channels.channel_gw(*self.consumers[g.producer])  # (channels,)
            if movement:
                scores[g.producer].sub_(gw)  # movement: -sum g w
            else:
                scores[g.producer].add_(gw.pow(2))  # group Taylor: (sum g w)^2

    def magnitude(self) -> dict[str, torch.Tensor]:
        return {n: channels.channel_magnitude(s) for n, s in self.slices.items()}

    def new_masks(self, ranking: dict[str, torch.Tensor], target: float) -> dict[str, torch.Tensor]:
        keeps = self.keeps()
        new = {
            g.producer: channels.channel_keep(ranking[g.producer].cpu(), keeps[g.producer], target)
            for g in self.groups
        }
        return channels.param_masks(self.model, self.groups, new)

    def keeps(self) -> dict[str, torch.Tensor]:
        return channels.keeps_from_masks(self.model, self.groups, self.masks.masks)

    def achieved_sparsity(self) -> float:
        """Fraction of prunable channels removed."""
        keeps = self.keeps()
        total = sum(k.numel() for k in keeps.values())
        return 1.0 - sum(int(k.sum()) for k in keeps.values()) / max(total, 1)


class CoupledGranularity:
    """Coupled channel groups (`coupled.find_groups`): whole units of every group, ranked
    globally (scope 'global') or the same fraction of each group (scope 'layer'; with
    `stage_ratios`, a fraction in proportion to its stage's ratio), to remove the target
    fraction of prunable weights (the conv and linear weights element pruning ranks)."""

    def __init__(self, cfg: PruningConfig, model: nn.Module) -> None:
        self.scope = cfg.scope
        graph = coupled.build_graph(model)
        groups = coupled.groups_of(graph, cfg.exclude)
        if not groups:
            raise UserError(
                f"pruning.granularity 'coupled': model {type(model).__name__} has no channel "
                "group that can be pruned; use granularity 'element'"
            )
        self.masks = MaskSet(coupled.group_parameters(model, groups))
        self.device = next(iter(self.masks.params.values())).device
        self.groups = [g.to(self.device) for g in groups]
        self.counter = coupled.WeightCounter(groups, coupled.counted_weights(graph, cfg.exclude))
        self.weights = None if cfg.stage_ratios is None else _stage_weights(groups, cfg)

    def fresh_scores(self) -> dict[str, torch.Tensor]:
        return {g.name: torch.zeros(g.channels, device=self.device) for g in self.groups}

    def accumulate(self, scores: dict[str, torch.Tensor], movement: bool) -> None:
        """Per channel, summed over every coupled slice: -g w (movement) or |g w| (Taylor, as
        Torch-Pruning's GroupTaylorImportance)."""
        names = [n for n, p in self.masks.params.items() if p.grad is not None]
        if not names:
            return
        gw = torch._foreach_mul(
            [self.masks.params[n].grad for n in names],
            [self.masks.params[n].detach() for n in names],
        )
        (torch._foreach_neg_ if movement else torch._foreach_abs_)(gw)
        step = coupled.channel_scores(self.groups, dict(zip(names, gw, strict=True)))
        for g, s in zip(self.groups, step, strict=True):
            scores[g.name].add_(s)

    def magnitude(self) -> dict[str, torch.Tensor]:
        """Per channel, sum of w^2 over every coupled slice."""
        squares = {n: p.detach().pow(2) for n, p in self.masks.params.items()}
        step = coupled.channel_scores(self.groups, squares)
        return {g.name: s for g, s in zip(self.groups, step, strict=True)}

    def new_masks(self, ranking: dict[str, torch.Tensor], target: float) -> dict[str, torch.Tensor]:
        scores = coupled.unit_scores(self.groups, [ranking[g.name] for g in self.groups])
        units = coupled.unit_keeps(self.groups, self._keeps())
        new = coupled.select_units(scores, units, target, self._removed, self.scope, self.weights)
        return coupled.param_masks(
            self.masks.params, self.groups, coupled.channel_keeps(self.groups, new)
        )

    def _removed(self, units: list[torch.Tensor]) -> float:
        return self.counter.removed_fraction(coupled.channel_keeps(self.groups, units))

    def _keeps(self) -> list[torch.Tensor]:
        return coupled.keeps_from_masks(self.groups, self.masks.masks)

    def keeps(self) -> dict[str, torch.Tensor]:
        return {g.name: k for g, k in zip(self.groups, self._keeps(), strict=True)}

    def achieved_sparsity(self) -> float:
        """Fraction of prunable weights removed (masked now, cut out by `coupled.slim`)."""
        return self.counter.removed_fraction(self._keeps())


def _stage_weights(groups: list[coupled.CoupledGroup], cfg: PruningConfig) -> list[float]:
    """`cfg.stage_ratios` as one weight per group; a stage the model lacks is the user's error."""
    if cfg.scope != "layer":
        raise UserError(f"pruning.stage_ratios need pruning.scope 'layer', not {cfg.scope!r}")
    try:
        return coupled.stage_weights(groups, cfg.stage_ratios)
    except ValueError as err:
        raise UserError(f"pruning.stage_ratios: {err}") from None


STRATEGIES: dict[str, type] = {
    "element": ElementGranularity,
    "channel": ChannelGranularity,
    "coupled": CoupledGranularity,
}


class Pruner:
    """LP / AGP (Taylor), movement and magnitude pruning of one model through the prune stage.

    The training loop owns the counters and calls: `after_backward()` each prune-stage step,
    `masks.mask_gradients()` before and `after_step(optimizer)` after each optimizer step,
    `end_of_epoch(epoch)` after each prune-stage epoch, `freeze()` before fine-tuning.

    What is pruned is the granularity's (`STRATEGIES`): `element` masks single weights; `channel`
    whole channel groups that `channels.shrink` can cut out; `coupled` whole coupled channel
    groups that `coupled.slim` cuts out.
    """

    def __init__(
        self, cfg: PruningConfig, model: nn.Module, *, prune_epochs: int, iters_per_epoch: int
    ) -> None:
        if cfg.granularity not in STRATEGIES:
            raise UserError(
                f"pruning.granularity {cfg.granularity!r}; allowed values: {', '.join(STRATEGIES)}"
            )
        self.cfg = cfg
        self.prune_epochs = prune_epochs
        self.iters_per_epoch = iters_per_epoch
        self.model = model
        self.granularity: Granularity = STRATEGIES[cfg.granularity](cfg, model)
        self.masks = self.granularity.masks
        self.scores = self.granularity.fresh_scores() if cfg.pruner in ACCUMULATING else {}
        self.frozen = False

    @property
    def groups(self) -> list:
        """The channel or coupled groups (none for element granularity)."""
        return getattr(self.granularity, "groups", [])

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
        self.granularity.accumulate(self.scores, movement=self.cfg.pruner == "mp")

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.masks.apply()
        self.masks.zero_momentum(optimizer)

    def end_of_epoch(self, epoch: int) -> bool:
        """Update masks if the schedule says so after this epoch; True if they changed."""
        if self.frozen or not self._is_update_epoch(epoch):
            return False
        magnitude = self.cfg.pruner == "magnitude"
        ranking = self.granularity.magnitude() if magnitude else self.scores
        self.masks.update(self.granularity.new_masks(ranking, self.target_sparsity(epoch)))
        if self.cfg.pruner in ("lp", "agp"):  # Taylor: a fresh estimate for the next interval
            for s in self.scores.values():
                s.zero_()
        return True

    def channel_keeps(self) -> dict[str, torch.Tensor]:
        """Channel and coupled granularity: which channels of each group are kept, (channels,)
        bool on CPU, by producer (channel) or group name (coupled)."""
        return self.granularity.keeps()

    def achieved_sparsity(self) -> float:
        """Fraction of prunable weights (element, coupled) or prunable channels (channel) removed."""
        return self.granularity.achieved_sparsity()

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
        device = next(iter(self.masks.params.values())).device
        self.scores = {n: s.to(device) for n, s in state["scores"].items()}
