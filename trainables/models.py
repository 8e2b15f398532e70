"""The five smp architectures behind one lookup table, with the encoder weights resolved offline-safely."""

from __future__ import annotations

from pathlib import Path

import segmentation_models_pytorch as smp
import torch
from torch import nn

from trainables.config import ModelConfig
from trainables.errors import UserError

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "unet": smp.Unet,
    "unetplusplus": smp.UnetPlusPlus,
    "fpn": smp.FPN,
    "linknet": smp.Linknet,
    "manet": smp.MAnet,
}


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """An smp model; `encoder_weights` is "imagenet", None, or a local weights file for the encoder."""
    if cfg.arch not in ARCHITECTURES:
        raise UserError(f"unknown model '{cfg.arch}'; valid: {', '.join(ARCHITECTURES)}")
    weights = cfg.encoder_weights
    local = weights is not None and weights != "imagenet"
    try:
        model = ARCHITECTURES[cfg.arch](
            encoder_name=cfg.encoder,
            encoder_weights=None if local else weights,
            classes=num_classes,
        )
    except KeyError as err:
        raise UserError(f"model.encoder '{cfg.encoder}' is not an smp encoder ({err})") from None
    except (OSError, RuntimeError, ValueError) as err:
        if weights == "imagenet":
            raise UserError(_imagenet_help(cfg.encoder, err)) from None
        raise
    if local:
        load_encoder_weights(model, Path(weights))
    return model


def _imagenet_help(encoder: str, err: Exception) -> str:
    return (
        f"ImageNet weights for encoder '{encoder}' could not be loaded ({type(err).__name__}). "
        "This machine may be offline. Either pre-fill the Hugging Face cache on a machine with "
        f'network (`python -c "import segmentation_models_pytorch as smp; '
        f"smp.create_model('fpn', encoder_name='{encoder}', encoder_weights='imagenet')\"`, then "
        "copy ~/.cache/huggingface and run with HF_HUB_OFFLINE=1), or pass a local file with "
        "--set model.encoder_weights=/path/to/encoder.pt (a state dict of the encoder), "
        "or train from scratch with --set model.encoder_weights=none."
    )


def load_encoder_weights(model: nn.Module, path: Path) -> None:
    """Load an encoder state dict from .pt/.pth (weights only) or .safetensors into `model.encoder`."""
    if not path.is_file():
        raise UserError(f"model.encoder_weights: file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a user error here
        raise UserError(f"model.encoder_weights: cannot read {path}: {err}") from None
    if not isinstance(state, dict):
        raise UserError(f"model.encoder_weights: {path} does not hold a state dict")
    missing, unexpected = model.encoder.load_state_dict(state, strict=False)
    if len(missing) == len(model.encoder.state_dict()):
        raise UserError(
            f"model.encoder_weights: no tensor in {path} matches the '{type(model.encoder).__name__}' "
            f"encoder (first keys: {list(state)[:3]})"
        )
    del unexpected  # extra keys (e.g. an ImageNet fc head) are expected and dropped
