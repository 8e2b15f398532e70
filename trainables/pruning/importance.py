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
