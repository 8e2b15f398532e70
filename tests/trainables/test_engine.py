"""Loss and optimiser: Tversky (= Dice at 0.5/0.5, absent classes), cyclical LR, ignored pixels."""

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


def _probabilities_as_logits(probs: list[list[float]]) -> torch.Tensor:
    """Logits (N=2, C=3, 1, 2) whose softmax is `probs` (one row of class probabilities per pixel)."""
    p = torch.tensor(probs, dtype=torch.float64).log()  # (4 pixels, 3 classes)
    return p.float().view(2, 1, 2, 3).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("weights", [None, (1.0, 2.0, 4.0)])
def test_tversky_gives_an_absent_class_zero_loss_but_still_divides_by_it(
    weights: tuple[float, ...] | None,
) -> None:
    # Two images of two pixels; class 2 is in neither image's truth, but gets probability.
    target = torch.tensor([[[0, 0]], [[1, 1]]])  # (N, H, W)
    probs = [[0.7, 0.2, 0.1], [0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.5, 0.4]]
    alpha, beta = 0.3, 0.7
    loss = build_loss(LossConfig(alpha=alpha, beta=beta, class_weights=weights))
    # Soft counts over the whole batch (not per image): TP = sum p over the class's pixels,
    # FP = sum p elsewhere, FN = sum (1 - p) over the class's pixels.
    tp0, fp0, fn0 = 0.7 + 0.5, 0.2 + 0.1, 0.3 + 0.5
    tp1, fp1, fn1 = 0.6 + 0.5, 0.2 + 0.25, 0.4 + 0.5
    per_class = [
        1 - tp0 / (tp0 + alpha * fp0 + beta * fn0),
        1 - tp1 / (tp1 + alpha * fp1 + beta * fn1),
        0.0,  # class 2: Tversky index 0 (TP 0, FP 0.95) would give 1; smp zeroes it
    ]
    w = weights or (1.0, 1.0, 1.0)
    expected = sum(wi * li for wi, li in zip(w, per_class, strict=True)) / sum(w)  # / 3 classes
    got = loss(_probabilities_as_logits(probs), target).item()
    assert math.isclose(got, expected, rel_tol=1e-5)
    present_only = (w[0] * per_class[0] + w[1] * per_class[1]) / (w[0] + w[1])
    assert not math.isclose(got, present_only, rel_tol=1e-3)


def test_tversky_does_not_penalise_wrong_mass_put_on_an_absent_class() -> None:
    # Each pixel gives 0.9 to its true class and 0.1 to a wrong one: the other present class,
    # or class 2, absent from the batch. TP and FN are the same both ways; only where the
    # false positives land differs.
    target = torch.tensor([[[0, 0]], [[1, 1]]])
    loss = build_loss(LossConfig(alpha=0.3, beta=0.7))
    eps = 1e-6  # instead of 0 (log 0); far below the tolerance
    to_present = [[0.9, 0.1, eps]] * 2 + [[0.1, 0.9, eps]] * 2
    to_absent = [[0.9, eps, 0.1]] * 2 + [[eps, 0.9, 0.1]] * 2
    # to_present: per class TP 1.8, FP 0.2, FN 0.2 -> 1 - 1.8 / (1.8 + 0.3 * 0.2 + 0.7 * 0.2)
    # to_absent: per class TP 1.8, FP 0, FN 0.2 -> 1 - 1.8 / (1.8 + 0.7 * 0.2); class 2: 0
    present = 2 * (1 - 1.8 / 2.0) / 3
    absent = 2 * (1 - 1.8 / 1.94) / 3
    assert math.isclose(
        loss(_probabilities_as_logits(to_present), target).item(), present, rel_tol=1e-4
    )
    assert math.isclose(
        loss(_probabilities_as_logits(to_absent), target).item(), absent, rel_tol=1e-4
    )
    assert absent < present  # a false alarm of an absent class costs nothing in this batch


def test_evaluate_reports_the_classes_its_mean_is_over() -> None:
    from trainables.engine import evaluate

    class Fixed(torch.nn.Module):
        """Predicts class 2 at every pixel of the first column, class 0 elsewhere."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = torch.zeros(x.shape[0], 3, *x.shape[-2:])  # (N, C, H, W)
            logits[:, 0] = 1.0
            logits[:, 2, :, 0] = 2.0
            return logits

    masks = torch.zeros(2, 4, 4, dtype=torch.long)
    masks[:, :, 2:] = 1  # classes 0 and 1 only; class 2 predicted but absent
    loader = [(torch.zeros(2, 3, 4, 4), masks)]
    result = evaluate(Fixed(), loader, build_loss(LossConfig()), 3, torch.device("cpu"))
    assert result["miou_classes"] == [0, 1]
    # Per image: class 0 (columns 0-1) TP 4, FN 4 (column 0 called 2), FP 8 (columns 2-3) -> 1/4;
    # class 1 TP 0 -> 0; class 2 TP 0, FP 4 -> 0, listed but left out of the mean.
    assert result["iou"] == [0.25, 0.0, 0.0]
    assert result["miou"] == (0.25 + 0.0) / 2 and result["miou_corrosion"] == 0.0
