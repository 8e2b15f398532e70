"""Lightweight exports: compact sparse files (non-zeros plus a bit mask) and ONNX."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainables.checkpoint import _atomic
from trainables.config import TrialConfig
from trainables.errors import UserError
from trainables.models import build_model
from trainables.pruning import channels

FORMAT = "corroprune-compact-v1"


def slim(model: nn.Module, cfg: TrialConfig, masks: dict[str, torch.Tensor] | None) -> nn.Module:
    """The deployable model: a channel-pruned one with its dropped channels cut out (in place);
    any other model as it is."""
    if cfg.pruning.granularity != "channel" or not masks:
        return model
    groups = channels.find_groups(model, cfg.pruning.exclude)
    return channels.shrink(model, groups, channels.keeps_from_masks(model, groups, masks))


def channel_structure(model: nn.Module, cfg: TrialConfig) -> dict[str, int]:
    """Channels per prunable group as the model has them now: what rebuilds a slim model."""
    if cfg.pruning.granularity != "channel":
        return {}
    return {g.producer: g.channels for g in channels.find_groups(model, cfg.pruning.exclude)}


def rebuild(cfg: TrialConfig, structure: dict[str, int]) -> nn.Module:
    """An untrained model of the stored architecture, slim where `structure` says so."""
    model = build_model(cfg.model, cfg.data.classes)
    if structure:
        channels.reshape_to(model, structure, cfg.pruning.exclude)
    return model


def _sparse_pays(tensor: torch.Tensor, value_bytes: int) -> bool:
    """Store as bit mask + non-zeros only where that is smaller than dense."""
    if not tensor.is_floating_point() or tensor.dim() < 2:
        return False
    nnz = int(torch.count_nonzero(tensor))
    return tensor.numel() / 8 + nnz * value_bytes < tensor.numel() * value_bytes


def compact_state(state: dict[str, torch.Tensor], *, fp16: bool) -> dict[str, torch.Tensor]:
    """Flat tensors: `name::mask` (packed bits) and `name::values` for sparse ones, `name` else."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        dtype = torch.float16 if fp16 and tensor.is_floating_point() and tensor.dim() >= 2 else None
        value_bytes = 2 if dtype is not None else tensor.element_size()
        if _sparse_pays(tensor, value_bytes):
            flat = tensor.flatten()
            nonzero = flat != 0
            bits = np.packbits(nonzero.numpy())
            out[f"{name}::mask"] = torch.from_numpy(bits)
            out[f"{name}::values"] = flat[nonzero].to(dtype or flat.dtype)
        else:
            out[name] = tensor.to(dtype) if dtype is not None else tensor
    return out


def expand_state(
    flat: dict[str, torch.Tensor], shapes: dict[str, list[int]], dtypes: dict[str, str]
) -> dict[str, torch.Tensor]:
    """Inverse of `compact_state`: dense tensors in their original shapes and dtypes."""
    state: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        dtype = getattr(torch, dtypes[name])
        if name in flat:
            state[name] = flat[name].to(dtype).reshape(shape)
            continue
        numel = int(np.prod(shape)) if shape else 1
        nonzero = np.unpackbits(flat[f"{name}::mask"].numpy(), count=numel).astype(bool)
        dense = torch.zeros(numel, dtype=dtype)
        dense[torch.from_numpy(nonzero)] = flat[f"{name}::values"].to(dtype)
        state[name] = dense.reshape(shape)
    return state


def export_compact(model: nn.Module, cfg: TrialConfig, path: Path, *, fp16: bool = False) -> Path:
    """A safetensors file: loading it runs no code, and it holds the config to rebuild the model."""
    from safetensors.torch import save_file

    state = model.state_dict()
    meta = {
        "format": FORMAT,
        "config": json.dumps(cfg.to_dict()),
        "shapes": json.dumps({k: list(v.shape) for k, v in state.items()}),
        "dtypes": json.dumps({k: str(v.dtype).removeprefix("torch.") for k, v in state.items()}),
        "channels": json.dumps(channel_structure(model, cfg)),
    }
    flat = compact_state(state, fp16=fp16)
    _atomic(Path(path), lambda tmp: save_file(flat, str(tmp), metadata=meta))
    return Path(path)


def compact_bytes(model: nn.Module, *, fp16: bool) -> int:
    """Size of the compact export of `model` (tensors and header), computed in memory."""
    from safetensors.torch import save

    return len(save(compact_state(model.state_dict(), fp16=fp16)))


def load_compact(path: Path) -> tuple[nn.Module, TrialConfig]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta: dict[str, Any] = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    except Exception as err:  # noqa: BLE001
        raise UserError(f"cannot read compact model {path}: {err}") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is not a corroprune compact model (format {meta.get('format')!r})")
    cfg = TrialConfig.from_dict(json.loads(meta["config"])).replace(model={"encoder_weights": None})
    try:
        model = rebuild(cfg, json.loads(meta.get("channels", "{}")))
        state = expand_state(flat, json.loads(meta["shapes"]), json.loads(meta["dtypes"]))
        model.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as err:
        raise UserError(
            f"compact model {path} does not fit its stored {cfg.model.arch}/{cfg.model.encoder} "
            f"structure: {str(err).splitlines()[0]}"
        ) from None
    return model.eval(), cfg


def export_onnx(model: nn.Module, path: Path, *, height: int, width: int) -> Path:
    """ONNX with dynamic batch and image size (multiples of 32)."""
    model = model.eval()
    example = torch.zeros(1, 3, height, width)
    tmp = Path(path).with_suffix(".tmp.onnx")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # smp's shape checks
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={
                    "image": {0: "batch", 2: "height", 3: "width"},
                    "logits": {0: "batch", 2: "height", 3: "width"},
                },
                opset_version=17,
                dynamo=False,
            )
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return Path(path)


def verify_onnx(model: nn.Module, path: Path, *, height: int, width: int, seed: int = 0) -> float:
    """Max absolute difference between onnxruntime's and torch's logits on a random image."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise UserError("ONNX check needs onnxruntime: pip install onnxruntime") from err
    x = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x.numpy()})[0]
    error = float(np.abs(got - expected).max())
    if not np.allclose(got, expected, atol=1e-3, rtol=1e-3):
        raise UserError(f"{path}: onnxruntime output differs from torch (max abs diff {error:.3g})")
    return error
