"""The Pruner with coupled granularity: scores accumulate per coupled channel, the schedule's
target is reached in prunable weights, masks hold, the cut model equals the masked one, and a
checkpoint resumes exactly."""

import copy

import pytest
import segmentation_models_pytorch as smp
import torch
from torch import nn

from tests.trainables.pruning.restore import restored
from trainables.config import PruningConfig, TrialConfig
from trainables.errors import UserError
from trainables.pruning import coupled
from trainables.pruning.pruner import Pruner

UNUSED = ("encoder.layer3", "encoder.layer4")  # built by smp, never run at encoder depth 3


def _model() -> nn.Module:
    """Unet on ResNet-18 down to stride 8: residual streams, concatenated skips, a BN decoder."""
    return smp.create_model(
        "unet",
        encoder_name="resnet18",
        encoder_weights=None,
        classes=4,
        encoder_depth=3,
        decoder_channels=(32, 16, 8),
    )


def _steps(model: nn.Module, pruner: Pruner, opt: torch.optim.Optimizer, n: int, prune: bool):
    gen = torch.Generator().manual_seed(n)
    for _ in range(n):
        x, y = (
            torch.randn(2, 3, 32, 32, generator=gen),
            torch.randint(0, 4, (2, 32, 32), generator=gen),
        )
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if prune:
            pruner.after_backward()
        pruner.masks.mask_gradients()
        opt.step()
        pruner.after_step(opt)


@pytest.mark.parametrize(
    ("name", "scope"), [("agp", "global"), ("mp", "layer"), ("magnitude", "global")]
)
def test_coupled_pruner_reaches_target_masks_hold_and_slim_equals_masked(
    name: str, scope: str
) -> None:
    model = _model()
    cfg = PruningConfig(
        pruner=name,
        sparsity=0.6,
        steps=2,
        granularity="coupled",
        scope=scope,
        mp_warmup_epochs=0,
        mp_cooldown_epochs=0,
    )
    pruner = Pruner(cfg, model, prune_epochs=2, iters_per_epoch=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    reached = []
    for epoch in (1, 2):
        _steps(model, pruner, opt, 2, prune=True)
        assert pruner.end_of_epoch(epoch)
        reached.append(pruner.achieved_sparsity())
    assert reached[0] == pytest.approx(pruner.target_sparsity(1), abs=0.02)
    assert reached[1] == pytest.approx(0.6, abs=0.02)
    keeps = pruner.channel_keeps()
    assert all(k.any() and not k.all() for k in keeps.values()) or scope == "global"
    pruner.freeze()
    _steps(model, pruner, opt, 2, prune=False)  # momentum and weight decay regrow nothing
    for n, p in pruner.masks.params.items():
        dropped = ~pruner.masks.masks[n]
        assert (p[dropped] == 0).all() and (opt.state[p]["momentum_buffer"][dropped] == 0).all()
    model.eval()
    slim = coupled.slim(copy.deepcopy(model), pruner.masks.masks, cfg.exclude)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(slim(x), model(x), atol=1e-4, rtol=1e-4)
    used = {n: p.numel() for n, p in model.named_parameters() if not n.startswith(UNUSED)}
    removed = sum(used.values()) - sum(
        p.numel() for n, p in slim.named_parameters() if not n.startswith(UNUSED)
    )
    assert removed > 0.5 * sum(used.values())


def test_taylor_scores_are_coupled_g_w_summed_over_steps_and_reset_after_an_update() -> None:
    model = _model()
    cfg = PruningConfig(pruner="lp", sparsity=0.5, steps=1, granularity="coupled")
    pruner = Pruner(cfg, model, prune_epochs=1, iters_per_epoch=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    groups = pruner.groups
    expected = [torch.zeros(g.channels) for g in groups]
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        x, y = (
            torch.randn(2, 3, 32, 32, generator=gen),
            torch.randint(0, 4, (2, 32, 32), generator=gen),
        )
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        gw = {n: (p.grad * p).abs().detach() for n, p in pruner.masks.params.items()}
        for e, s in zip(expected, coupled.channel_scores(groups, gw), strict=True):
            e += s
        pruner.after_backward()
        opt.step()
    for g, e in zip(groups, expected, strict=True):
        torch.testing.assert_close(pruner.scores[g.name], e)
    assert pruner.end_of_epoch(1)
    assert not any(s.any() for s in pruner.scores.values())


@pytest.mark.parametrize("granularity", ["channel", "coupled"])
def test_pruner_resumes_exactly_from_a_checkpoint_mid_stage(granularity: str) -> None:
    """Masks and the scores of the interval under way come back (channel granularity's scores,
    keyed by producer, once failed to load)."""
    model = _model()
    cfg = PruningConfig(pruner="agp", sparsity=0.5, steps=2, granularity=granularity)
    pruner = Pruner(cfg, model, prune_epochs=2, iters_per_epoch=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _steps(model, pruner, opt, 1, prune=True)
    pruner.end_of_epoch(1)
    _steps(model, pruner, opt, 1, prune=True)  # scores of the next interval under way
    _, fresh = restored(model, pruner, cfg, _model, prune_epochs=2, iters_per_epoch=1)
    assert fresh.channel_keeps().keys() == pruner.channel_keeps().keys()
    assert all(torch.equal(fresh.channel_keeps()[n], k) for n, k in pruner.channel_keeps().items())
    assert fresh.achieved_sparsity() == pruner.achieved_sparsity()
    for n, s in pruner.scores.items():
        assert torch.equal(fresh.scores[n], s)
    assert fresh.end_of_epoch(2) and pruner.end_of_epoch(2)
    for n, m in pruner.masks.masks.items():
        assert torch.equal(fresh.masks.masks[n], m)


def test_config_accepts_coupled_in_either_scope_and_names_the_choices() -> None:
    base = {"pruner": "agp", "sparsity": 0.5, "steps": 5}
    for scope in ("layer", "global"):
        cfg = TrialConfig.from_dict({"pruning": {**base, "granularity": "coupled", "scope": scope}})
        assert (cfg.pruning.granularity, cfg.pruning.scope) == ("coupled", scope)
    with pytest.raises(
        UserError, match=r"pruning\.granularity.*allowed values: element, channel, coupled"
    ):
        TrialConfig.from_dict({"pruning": {**base, "granularity": "filter"}})
    with pytest.raises(UserError, match=r"pruning\.scope.*use pruning\.granularity 'coupled'"):
        TrialConfig.from_dict({"pruning": {**base, "granularity": "channel", "scope": "global"}})
