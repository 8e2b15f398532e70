"""All five architectures learn on synthetic data; encoder weights resolve offline or fail clearly."""

import pytest
import torch

from trainables.config import LossConfig, ModelConfig, OptimConfig
from trainables.data.synth import generate_sample
from trainables.engine import build_loss, build_optimizer
from trainables.errors import UserError
from trainables.models import ARCHITECTURES, build_model

ARCHS = sorted(ARCHITECTURES)


def _batch(n: int = 4, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    rng = np.random.default_rng(0)
    pairs = [generate_sample(rng, size, 4) for _ in range(n)]
    images = torch.stack([torch.from_numpy(img).permute(2, 0, 1).float() / 255 for img, _ in pairs])
    masks = torch.stack([torch.from_numpy(mask).long() for _, mask in pairs])
    return (images - 0.45) / 0.225, masks  # (N, 3, H, W), (N, H, W)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_falls_on_synthetic_data(arch: str) -> None:
    model = build_model(ModelConfig(arch=arch, encoder="tu-test_resnet", encoder_weights=None), 4)
    loss_fn = build_loss(LossConfig())
    optimizer, _ = build_optimizer(model, OptimConfig())
    for group in optimizer.param_groups:
        group["lr"] = 0.05
    images, masks = _batch()
    model.train()
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = loss_fn(model(images), masks)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.02, losses


def test_imagenet_weights_offline_give_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ModelConfig(arch="unet", encoder="resnet18", encoder_weights="imagenet")
    with pytest.raises(UserError, match="pre-fill the Hugging Face cache.*encoder_weights"):
        build_model(cfg, 4)


def test_local_encoder_weights_file_is_loaded(tmp_path) -> None:
    cfg = ModelConfig(arch="linknet", encoder="tu-test_resnet", encoder_weights=None)
    source = build_model(cfg, 4)
    path = tmp_path / "encoder.pt"
    torch.save(source.encoder.state_dict(), path)
    loaded = build_model(
        ModelConfig(arch="fpn", encoder="tu-test_resnet", encoder_weights=str(path)), 4
    )
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[key], value)


def test_bad_encoder_weights_file_is_named(tmp_path) -> None:
    bad = tmp_path / "enc.pt"
    bad.write_bytes(b"not a checkpoint")
    cfg = ModelConfig(arch="fpn", encoder="tu-test_resnet", encoder_weights=str(bad))
    with pytest.raises(UserError, match="enc.pt"):
        build_model(cfg, 4)
    with pytest.raises(UserError, match="file not found"):
        build_model(
            ModelConfig(arch="fpn", encoder="tu-test_resnet", encoder_weights="/nope.pt"), 4
        )
