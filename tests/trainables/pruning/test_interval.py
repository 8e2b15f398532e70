"""Pruning at the paper's interval: several epochs between mask updates, scores over all of them."""

import pytest
import torch
from torch import nn

from trainables.config import PruningConfig
from trainables.pruning.pruner import Pruner

ITERS = 4  # iterations per epoch


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def _epoch(
    net: nn.Module, pruner: Pruner, opt: torch.optim.Optimizer, gen: torch.Generator
) -> dict[str, list[torch.Tensor]]:
    """One epoch in the training loop's order; returns each step's g and w, read after backward."""
    seen: dict[str, list[torch.Tensor]] = {"g": [], "w": []}
    for _ in range(ITERS):
        x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 4, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        seen["g"].append({n: p.grad.clone() for n, p in pruner.masks.params.items()})
        seen["w"].append({n: p.detach().clone() for n, p in pruner.masks.params.items()})
        pruner.after_backward()
        pruner.masks.mask_gradients()
        opt.step()
        pruner.after_step(opt)
    return seen


def _expected_keep(scores: torch.Tensor, keep: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Written out: drop the round(sparsity * n) lowest scores, already-dropped entries first."""
    ranked = torch.where(keep, scores, torch.tensor(float("-inf"))).flatten()
    drop = ranked.argsort()[: round(sparsity * ranked.numel())]
    out = torch.ones(ranked.numel(), dtype=torch.bool)
    out[drop] = False
    return out.view_as(keep)


@pytest.mark.parametrize(("pruner_name", "first"), [("lp", 0.3), ("agp", 0.6 * (1 - 0.5**3))])
def test_taylor_scores_accumulate_over_the_interval_and_reset_at_each_update(
    pruner_name: str, first: float
) -> None:
    net = _net()
    cfg = PruningConfig(pruner=pruner_name, sparsity=0.6, steps=2)
    pruner = Pruner(cfg, net, prune_epochs=6, iters_per_epoch=ITERS)  # an update every 3 epochs
    assert [pruner.target_sparsity(e) for e in range(7)] == [0, 0, 0, first, first, first, 0.6]
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.5)
    gen = torch.Generator().manual_seed(1)
    names = list(pruner.masks.params)
    expected = {n: torch.zeros_like(p) for n, p in pruner.masks.params.items()}
    for epoch in range(1, 7):
        before = {n: m.clone() for n, m in pruner.masks.masks.items()}
        seen = _epoch(net, pruner, opt, gen)
        for g, w in zip(seen["g"], seen["w"], strict=True):
            for n in names:
                expected[n] += (g[n] * w[n]) ** 2  # first-order Taylor, on the masked weights
        for n in names:
            torch.testing.assert_close(pruner.scores[n], expected[n])
        changed = pruner.end_of_epoch(epoch)
        assert changed == (epoch in (3, 6)), epoch
        if not changed:
            assert all(torch.equal(pruner.masks.masks[n], before[n]) for n in names), epoch
            continue
        for n in names:
            want = _expected_keep(expected[n], before[n], pruner.target_sparsity(epoch))
            assert torch.equal(pruner.masks.masks[n], want), (epoch, n)
            assert not pruner.scores[n].any(), "scores reset after an update"
            assert (pruner.masks.params[n][~want] == 0).all()
            expected[n].zero_()
    assert pruner.masks.sparsity() == pytest.approx(0.6, abs=0.02)


def test_movement_scores_accumulate_through_warm_up_ramp_and_cool_down() -> None:
    net = _net()
    cfg = PruningConfig(pruner="mp", sparsity=0.5, mp_warmup_epochs=2, mp_cooldown_epochs=2)
    pruner = Pruner(cfg, net, prune_epochs=8, iters_per_epoch=ITERS)
    # Iterations: 8 warm-up, a 16-iteration cubic ramp (epochs 3-6), 8 cool-down at the target.
    ramp = [0.5 * (1 - (1 - k / 4) ** 3) for k in range(1, 5)]
    targets = [pruner.target_sparsity(e) for e in range(1, 9)]
    assert targets == pytest.approx([0.0, 0.0, *ramp, 0.5, 0.5])
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.5)
    gen = torch.Generator().manual_seed(2)
    names = list(pruner.masks.params)
    expected = {n: torch.zeros_like(p) for n, p in pruner.masks.params.items()}
    changed = []
    for epoch in range(1, 9):
        before = {n: m.clone() for n, m in pruner.masks.masks.items()}
        seen = _epoch(net, pruner, opt, gen)
        for g, w in zip(seen["g"], seen["w"], strict=True):
            for n in names:
                expected[n] -= g[n] * w[n]  # movement: -sum_t g w, never reset
        for n in names:
            torch.testing.assert_close(pruner.scores[n], expected[n])
        changed.append(pruner.end_of_epoch(epoch))
        for n in names:
            want = before[n]
            if changed[-1]:
                want = _expected_keep(expected[n], before[n], targets[epoch - 1])
            assert torch.equal(pruner.masks.masks[n], want), (epoch, n)
    assert changed == [False, False, True, True, True, True, False, False]
    assert pruner.masks.sparsity() == pytest.approx(0.5, abs=0.02)
