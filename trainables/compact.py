"""The compact sparse format: a bit mask plus the non-zeros for each tensor where that is smaller.

Pure functions on state dicts; `deploy/export.py` writes them to a file, `deploy/artefacts.py`
reads them back, and a trial records the size (`compact_bytes`) of its deployable model.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

FORMAT = "corroprune-compact-v1"


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


def compact_bytes(model: nn.Module, *, fp16: bool) -> int:
    """Size of the compact export of `model` (tensors and header), computed in memory."""
    from safetensors.torch import save

    return len(save(compact_state(model.state_dict(), fp16=fp16)))
