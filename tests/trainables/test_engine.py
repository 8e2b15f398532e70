"""Loss and optimiser: Tversky = Dice at alpha = beta = 0.5, the cyclical LR's values, ignored pixels."""

import math

import pytest
import torch
from segmentation_models_pytorch.losses import DiceLoss

from trainables.config import LossConfig, OptimConfig
from trainables.engine import IGNORE_INDEX, build_loss, build_optimizer, pad_collate


def test_tversky_equals_dice_at_half_half() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 16, 16, generator=g)
    target = torch.randint(0, 4, (2, 16, 16), generator=g)
    tversky = build_loss(LossConfig(alpha=0.5, beta=0.5))(logits, target)
    dice = DiceLoss(mode="multiclass", ignore_index=IGNORE_INDEX)(logits, target)
    assert torch.allclose(tversky, dice, atol=1e-6)


@pytest.mark.parametrize(("alpha", "beta"), [(0.3, 0.7), (0.7, 0.3)])
def test_tversky_matches_its_equation(alpha: float, beta: float) -> None:
    target = torch.ones(1, 8, 8, dtype=torch.long)
    target[:, :4] = 0
    logits = torch.full((1, 2, 8, 8), -20.0)
    logits[:, 0] = 20.0  # background everywhere: 32 FP for class 0, 32 FN for class 1
    loss = build_loss(LossConfig(alpha=alpha, beta=beta))(logits, target)
    tversky = [32 / (32 + alpha * 32 + beta * 0), 0 / (0 + alpha * 0 + beta * 32)]
    assert math.isclose(loss.item(), 1 - sum(tversky) / 2, rel_tol=1e-4)


def test_ignored_pixels_do_not_change_the_loss() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 3, 8, 8, generator=g)
    target = torch.randint(0, 3, (1, 8, 8), generator=g)
    loss = build_loss(LossConfig())
    noisy_logits = logits.clone()
    target_ignored = target.clone()
    target_ignored[:, :, 6:] = IGNORE_INDEX
    noisy_logits[:, :, :, 6:] = torch.randn(1, 3, 8, 2, generator=g) * 10
    assert torch.allclose(loss(logits, target_ignored), loss(noisy_logits, target_ignored))


def test_cyclical_lr_is_triangular_with_constant_momentum() -> None:
    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = build_optimizer(model, OptimConfig(half_cycle_iters=2000))
    lrs = {}
    for it in range(4001):
        lrs[it] = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
    assert math.isclose(lrs[0], 1e-4)
    assert math.isclose(lrs[1000], 1e-4 + (1e-2 - 1e-4) / 2, rel_tol=1e-9)
    assert math.isclose(lrs[2000], 1e-2, rel_tol=1e-9)
    assert math.isclose(lrs[3000], lrs[1000], rel_tol=1e-9)
    assert math.isclose(lrs[4000], 1e-4, rel_tol=1e-9)
    assert optimizer.param_groups[0]["momentum"] == 0.5


def test_pad_collate_pads_images_with_zeros_and_masks_with_ignore() -> None:
    a = (torch.ones(3, 4, 6), torch.zeros(4, 6, dtype=torch.long))
    b = (torch.ones(3, 6, 4), torch.ones(6, 4, dtype=torch.long))
    images, masks = pad_collate([a, b])
    assert images.shape == (2, 3, 6, 6) and masks.shape == (2, 6, 6)
    assert images[0, :, 4:].abs().sum() == 0 and (masks[0, 4:] == IGNORE_INDEX).all()
    assert (masks[1, :, 4:] == IGNORE_INDEX).all() and (masks[1, :, :4] == 1).all()


@pytest.mark.parametrize("half", [1, 7])
def test_cyclical_lr_period_follows_config(half: int) -> None:
    model = torch.nn.Linear(1, 1)
    optimizer, scheduler = build_optimizer(model, OptimConfig(half_cycle_iters=half))
    for _ in range(2 * half):
        optimizer.step()
        scheduler.step()
    assert math.isclose(scheduler.get_last_lr()[0], 1e-4)


def test_bf16_autocast_and_channels_last_train_like_fp32() -> None:
    from trainables.config import ModelConfig, RuntimeConfig
    from trainables.engine import forward, make_loader, train_one_epoch
    from trainables.models import build_model

    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(3, 64, 64, generator=g), torch.randint(0, 4, (64, 64), generator=g))
        for _ in range(8)
    ]
    losses = {}
    for amp in (False, True):
        torch.manual_seed(0)
        model = build_model(
            ModelConfig(arch="linknet", encoder="tu-test_resnet", encoder_weights=None), 4
        )
        runtime = RuntimeConfig(amp=amp, channels_last=amp, progress=False)
        if amp:
            model = model.to(memory_format=torch.channels_last)
        optimizer, scheduler = build_optimizer(model, OptimConfig())
        loader = make_loader(data, 4, train=False)
        losses[amp] = train_one_epoch(
            model,
            loader,
            build_loss(LossConfig()),
            optimizer,
            scheduler,
            torch.device("cpu"),
            runtime=runtime,
        )
        assert forward(model, data[0][0][None], runtime).dtype == torch.float32
    assert math.isfinite(losses[True]) and losses[True] == pytest.approx(losses[False], rel=0.05)
