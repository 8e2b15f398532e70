"""Importance scores on tensors: first-order Taylor, movement and magnitude."""

from __future__ import annotations

import torch


def taylor_score(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """(g * w)^2: the squared first-order estimate of the loss change from zeroing w (Molchanov 2019)."""
    return (grad * weight).pow(2)


def movement_score(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """-g * w per step: positive when the update moves the weight away from zero (Sanh 2020)."""
    return -(grad * weight)


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    return weight.abs()


def taylor_scores(weights: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """`taylor_score` of many tensors in a few multi-tensor kernels (float32)."""
    gw = torch._foreach_mul(grads, weights)
    torch._foreach_mul_(gw, gw)
    return [t.float() for t in gw]


def movement_scores(weights: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """`movement_score` of many tensors in a few multi-tensor kernels (float32)."""
    gw = torch._foreach_mul(grads, weights)
    torch._foreach_neg_(gw)
    return [t.float() for t in gw]
