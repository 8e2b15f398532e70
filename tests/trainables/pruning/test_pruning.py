"""Pruning: schedules equal the paper's equations, Taylor ranks like the true loss change, masks hold."""

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
from torch import nn

from tests.trainables.pruning.restore import restored
from trainables.config import PruningConfig
from trainables.pruning.importance import movement_score, taylor_score
from trainables.pruning.masks import global_masks, layer_masks, prunable_parameters
from trainables.pruning.pruner import Pruner
from trainables.pruning.schedules import agp_sparsity, cubic_sparsity, linear_sparsity


def test_schedules_equal_equations_3_and_4() -> None:
    n, dt, t0, zf = 5, 10, 100, 0.9
    for k in range(1, n + 1):
        t = t0 + k * dt
        eq3 = 0.0 + (t - t0) / (n * dt) * zf
        eq4 = zf + (0.0 - zf) * (1 - (t - t0) / (n * dt)) ** 3
        assert linear_sparsity(k, n, 0.0, zf) == pytest.approx(eq3)
        assert agp_sparsity(k, n, 0.0, zf) == pytest.approx(eq4)
    assert agp_sparsity(1, 5, 0.0, 0.9) == pytest.approx(0.9 * (1 - 0.8**3))
    assert agp_sparsity(5, 5, 0.0, 0.9) == pytest.approx(0.9)


def test_movement_schedule_warms_up_ramps_and_cools_down() -> None:
    kw = {"total": 500, "warmup": 200, "cooldown": 100, "initial": 0.0, "final": 0.5}
    values = [cubic_sparsity(it, **kw) for it in range(501)]
    assert all(v == 0.0 for v in values[:201])
    assert all(v == 0.5 for v in values[400:])
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert cubic_sparsity(300, **kw) == pytest.approx(0.5 * (1 - 0.5**3))


def _tiny_regression() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(64, 6)
    y = torch.randn(64, 1)
    return net, x, y


def _ranks(v: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(v)).astype(float)


def test_taylor_importance_ranks_like_the_brute_force_loss_change() -> None:
    net, x, y = _tiny_regression()
    weight = net[0].weight
    loss = nn.functional.mse_loss(net(x), y)
    loss.backward()
    taylor = taylor_score(weight.detach(), weight.grad).flatten().numpy()
    brute = []
    with torch.no_grad():
        for i in range(weight.numel()):
            saved = weight.view(-1)[i].item()
            weight.view(-1)[i] = 0.0
            brute.append((nn.functional.mse_loss(net(x), y).item() - loss.item()) ** 2)
            weight.view(-1)[i] = saved
    rho = np.corrcoef(_ranks(taylor), _ranks(np.array(brute)))[0, 1]
    assert rho > 0.8, rho


def test_movement_score_sign_follows_the_gradient() -> None:
    w = torch.tensor([1.0, 1.0, -1.0, -1.0])
    g = torch.tensor([-0.5, 0.5, -0.5, 0.5])  # SGD moves w by -g
    score = movement_score(w, g)
    assert score.tolist() == [0.5, -0.5, -0.5, 0.5]  # positive = moving away from zero


@pytest.mark.parametrize("sparsity", [0.2, 0.5, 0.9])
def test_exact_sparsity_per_layer_and_globally(sparsity: float) -> None:
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(7, 13, generator=g), "b": torch.rand(3, 3, 5, 5, generator=g)}
    masks = {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
    for name, m in layer_masks(scores, masks, sparsity).items():
        assert abs((~m).sum().item() - sparsity * m.numel()) <= 1, name
    glob = global_masks(scores, masks, sparsity)
    total = sum(m.numel() for m in glob.values())
    assert sum((~m).sum().item() for m in glob.values()) == round(sparsity * total)


def test_pruned_entries_never_come_back_when_ranked_again() -> None:
    scores = {"a": torch.arange(10.0)}
    first = layer_masks(scores, {"a": torch.ones(10, dtype=torch.bool)}, 0.3)
    reversed_scores = {"a": torch.arange(10.0).flip(0)}  # now the pruned ones score highest
    second = layer_masks(reversed_scores, first, 0.5)
    assert not (second["a"] & ~first["a"]).any()
    assert (~second["a"]).sum() == 5


# ResNet-14-T (bottleneck blocks throughout) at a quarter of its widths: at full width, MA-Net's
# decoder on its 2048 channels holds 118M weights that only make the test slow.
NARROW = {"tu-resnet14t": {"channels": (16, 32, 64, 128)}}


def _model(encoder: str = "tu-test_resnet", arch: str = "fpn") -> nn.Module:
    small = (
        {"decoder_channels": (64, 32, 16, 16, 8)}
        if arch in ("unet", "unetplusplus", "manet")
        else {}
    )
    narrow = NARROW.get(encoder, {})
    return smp.create_model(
        arch, encoder_name=encoder, encoder_weights=None, classes=4, **small, **narrow
    )


def _train_steps(model, pruner, steps: int, stage_prune: bool = True) -> torch.optim.Optimizer:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(2, 3, 32, 32, generator=g)
        y = torch.randint(0, 4, (2, 32, 32), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if stage_prune:
            pruner.after_backward()
        pruner.masks.mask_gradients()
        opt.step()
        pruner.after_step(opt)
    return opt


def test_pruned_weights_stay_zero_through_momentum_and_a_checkpoint() -> None:
    model = _model()
    cfg = PruningConfig(pruner="agp", sparsity=0.9, steps=2)
    pruner = Pruner(cfg, model, prune_epochs=2, iters_per_epoch=3)
    for epoch in (1, 2):
        _train_steps(model, pruner, 3)
        assert pruner.end_of_epoch(epoch)
    pruner.freeze()
    opt = _train_steps(model, pruner, 10, stage_prune=False)
    for name, p in pruner.masks.params.items():
        assert (p[~pruner.masks.masks[name]] == 0).all(), name
        buf = opt.state[p]["momentum_buffer"]
        assert (buf[~pruner.masks.masks[name]] == 0).all()
    assert pruner.masks.sparsity() == pytest.approx(0.9, abs=1e-3)
    fresh_model, fresh = restored(model, pruner, cfg, _model, prune_epochs=2, iters_per_epoch=3)
    assert fresh.frozen
    _train_steps(fresh_model, fresh, 3, stage_prune=False)
    for name, p in fresh.masks.params.items():
        assert (p[~fresh.masks.masks[name]] == 0).all()


def test_masks_shrink_monotonically_along_the_schedule() -> None:
    model = _model()
    pruner = Pruner(
        PruningConfig(pruner="lp", sparsity=0.6, steps=3), model, prune_epochs=3, iters_per_epoch=2
    )
    previous = {n: m.clone() for n, m in pruner.masks.masks.items()}
    for epoch in (1, 2, 3):
        _train_steps(model, pruner, 2)
        pruner.end_of_epoch(epoch)
        assert pruner.masks.sparsity() == pytest.approx(0.2 * epoch, abs=0.01)
        for n, m in pruner.masks.masks.items():
            assert not (m & ~previous[n]).any()
        previous = {n: m.clone() for n, m in pruner.masks.masks.items()}


def test_head_excluded_by_default_and_exclude_is_honoured() -> None:
    model = _model()
    names = prunable_parameters(model, ("segmentation_head",))
    assert names and not any(n.startswith("segmentation_head") for n in names)
    assert any(n.startswith("decoder") for n in names) and any(
        n.startswith("encoder") for n in names
    )
    no_decoder = prunable_parameters(model, ("segmentation_head", "decoder"))
    assert not any(n.startswith("decoder") for n in no_decoder)
    with_head = prunable_parameters(model, ())
    assert any(n.startswith("segmentation_head") for n in with_head)
    assert all(n.endswith(".weight") for n in names)


def test_movement_pruner_updates_along_the_ramp_only() -> None:
    model = _model()
    cfg = PruningConfig(pruner="mp", sparsity=0.5, mp_warmup_epochs=1, mp_cooldown_epochs=1)
    pruner = Pruner(cfg, model, prune_epochs=4, iters_per_epoch=2)
    changed = []
    for epoch in range(1, 5):
        _train_steps(model, pruner, 2)
        changed.append(pruner.end_of_epoch(epoch))
    assert changed == [False, True, True, False]
    assert pruner.masks.sparsity() == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("arch", ["unet", "unetplusplus", "fpn", "linknet", "manet"])
@pytest.mark.parametrize(
    "encoder", ["tu-test_resnet", "tu-resnet14t"]
)  # basic blocks (and one bottleneck), bottleneck blocks only
def test_every_architecture_prunes_to_90_percent_and_runs(arch: str, encoder: str) -> None:
    model = _model(encoder, arch)
    pruner = Pruner(
        PruningConfig(pruner="magnitude", sparsity=0.9, steps=1),
        model,
        prune_epochs=1,
        iters_per_epoch=1,
    )
    assert pruner.end_of_epoch(1)
    assert pruner.masks.sparsity() == pytest.approx(0.9, abs=1e-3)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 4, 64, 64) and torch.isfinite(out).all()


def test_multi_tensor_scores_equal_the_per_tensor_ones() -> None:
    from trainables.pruning.importance import movement_scores, taylor_scores

    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]
    grads = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]
    for many, one in ((taylor_scores, taylor_score), (movement_scores, movement_score)):
        for got, w, g in zip(many(weights, grads), weights, grads, strict=True):
            torch.testing.assert_close(got, one(w, g))
