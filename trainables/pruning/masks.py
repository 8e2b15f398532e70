"""What is prunable, masks computed from scores with exact counts, and masks kept in force."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

PRUNABLE_TYPES = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def prunable_parameters(model: nn.Module, exclude: Sequence[str]) -> dict[str, nn.Parameter]:
    """Weights of conv and linear layers whose module name starts with none of `exclude`."""
    params = {}
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE_TYPES):
            continue
        if any(name.startswith(prefix) for prefix in exclude):
            continue
        params[f"{name}.weight"] = module.weight
    return params


def _ranked(score: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scores with already-pruned entries below everything, so masks only ever shrink."""
    return torch.where(
        mask, score.float(), torch.full_like(score, float("-inf"), dtype=torch.float)
    )


def keep_top(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean keep-mask with exactly the `k` lowest entries dropped (ties broken by position).

    A k-th value threshold is O(n), unlike a full sort: MA-Net's 38M-weight convolutions matter.
    """
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k <= 0:
        return keep
    if k >= flat.numel():
        return ~keep
    threshold = flat.kthvalue(k).values  # (,)
    below = flat < threshold
    ties = torch.nonzero(flat == threshold).flatten()
    keep[below] = False
    keep[ties[: k - int(below.sum())]] = False
    return keep


def layer_masks(
    scores: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], sparsity: float
) -> dict[str, torch.Tensor]:
    """Per tensor, exactly round(sparsity * numel) lowest-scoring entries set to False."""
    out = {}
    for name, score in scores.items():
        flat = _ranked(score, masks[name]).flatten()
        out[name] = keep_top(flat, round(sparsity * flat.numel())).view_as(score)
    return out


def global_masks(
    scores: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], sparsity: float
) -> dict[str, torch.Tensor]:
    """One ranking across all tensors: exactly round(sparsity * total) entries set to False."""
    names = list(scores)
    flat = torch.cat([_ranked(scores[n], masks[n]).flatten().cpu() for n in names])
    keep = keep_top(flat, round(sparsity * flat.numel()))
    out, offset = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = keep[offset : offset + size].view_as(scores[n]).to(scores[n].device)
        offset += size
    return out


class MaskSet:
    """Boolean masks for named weights, re-applied to weights, gradients and momentum.

    Each re-application is one multi-tensor (`torch._foreach_mul_`) call over all masked tensors
    instead of one kernel per tensor: ResNet-101 models have hundreds of them, and on a GPU the
    per-kernel launch cost, not the arithmetic, is what a masked step adds."""

    def __init__(self, params: dict[str, nn.Parameter]) -> None:
        self.params = params
        self.masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}

    def _pairs(self, tensors: dict[str, torch.Tensor | None]) -> tuple[list, list]:
        names = [n for n, t in tensors.items() if t is not None]
        return [tensors[n] for n in names], [self.masks[n] for n in names]

    @torch.no_grad()
    def apply(self) -> None:
        torch._foreach_mul_(*self._pairs(self.params))

    @torch.no_grad()
    def mask_gradients(self) -> None:
        grads, masks = self._pairs({n: p.grad for n, p in self.params.items()})
        if grads:
            torch._foreach_mul_(grads, masks)

    @torch.no_grad()
    def zero_momentum(self, optimizer: torch.optim.Optimizer) -> None:
        state = optimizer.state
        bufs, masks = self._pairs(
            {n: state.get(p, {}).get("momentum_buffer") for n, p in self.params.items()}
        )
        if bufs:
            torch._foreach_mul_(bufs, masks)

    def update(self, new: dict[str, torch.Tensor]) -> None:
        self.masks = {n: new[n].to(self.params[n].device) for n in self.params}
        self.apply()

    def sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1.0 - kept / max(total, 1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: m.cpu() for n, m in self.masks.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.params) - set(state)
        if missing:
            raise KeyError(f"masks missing for {sorted(missing)[:3]}")
        self.update({n: state[n].bool() for n in self.params})


def sparsity_stats(
    model: nn.Module, masks: MaskSet | None, achieved: float | None = None
) -> dict[str, float | int]:
    """Sparsity over prunable units (`achieved`, else from the masks) and over all parameters
    (exact zeros)."""
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    prunable = sum(m.numel() for m in masks.masks.values()) if masks is not None else 0
    if achieved is None:
        achieved = masks.sparsity() if masks is not None else 0.0
    return {
        "achieved_sparsity": achieved,
        "overall_sparsity": 1.0 - nonzero / max(total, 1),
        "nonzero_params": nonzero,
        "total_params": total,
        "prunable_params": prunable,
    }
