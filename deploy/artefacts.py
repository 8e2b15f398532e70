"""One loader for every artefact a run ships: a run checkpoint, a compact file, an ONNX model.

`load_artefact` picks the runtime once, from the file's suffix: torch for a checkpoint (`.pt`)
or a compact export (`.safetensors`), ONNX Runtime on the CPU for `.onnx` (fp32 or INT8). The
`Artefact` it returns runs a batch the same way whatever the kind, and says what it predicts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from trainables.checkpoint import load_checkpoint
from trainables.compact import FORMAT as COMPACT_FORMAT
from trainables.compact import expand_state
from trainables.config import TrialConfig
from trainables.data import class_names
from trainables.errors import UserError
from trainables.models import build_model
from trainables.pruning.surgery import load_slim, rebuild, slim

# The metadata_props an exported ONNX file carries, so that the file alone knows what it is.
ONNX_FORMAT = "corroprune-onnx-v1"
META_FORMAT = "corroprune.format"
META_CONFIG = "corroprune.config"  # the trial config, JSON
META_CLASSES = "corroprune.class_names"  # JSON list
META_PRECISION = "corroprune.precision"  # "fp32" | "int8"
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger"}

RUNTIMES = {
    "checkpoint": "torch",
    "compact": "torch",
    "onnx": "onnxruntime",
    "onnx-int8": "onnxruntime-int8",
}


def onnxruntime() -> ModuleType:
    """The onnxruntime module, or a UserError saying how to get it."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError(
            "ONNX models need onnxruntime, which is not installed: pip install onnxruntime"
        ) from None
    return ort


def onnx_module() -> ModuleType:
    try:
        import onnx
    except ImportError:
        raise UserError("ONNX export needs the onnx package: pip install onnx") from None
    return onnx


def names_of(cfg: TrialConfig) -> tuple[str, ...]:
    """The class names a model trained with `cfg` predicts (a folder set's own classes.txt when
    it is still there, else the dataset's standard names)."""
    folder = cfg.data.dataset == "folder" and cfg.data.root
    return class_names(Path(cfg.data.root) if folder else None, cfg.data.classes)


class TorchRunner:
    """Runs batches through a torch model on one device."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model.eval().to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        x = torch.as_tensor(images, dtype=torch.float32).to(self.device)  # (N, 3, H, W)
        return self.model(x).float().cpu().numpy()  # (N, C, H, W)


class OrtRunner:
    """Runs batches through an ONNX Runtime session (CPU)."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.input = session.get_inputs()[0].name

    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        x = np.ascontiguousarray(images, dtype=np.float32)  # (N, 3, H, W)
        return self.session.run(None, {self.input: x})[0]  # (N, C, H, W)


@dataclass(frozen=True)
class Artefact:
    """A loaded model file. Call it on a float32 NCHW batch (numpy or torch, ImageNet-normalised)
    for float32 logits (N, C, H, W) as numpy. `cfg` is the trial config where the file holds one
    (None for an ONNX file from elsewhere)."""

    path: Path
    kind: str  # a key of RUNTIMES
    cfg: TrialConfig | None
    class_names: tuple[str, ...]
    runner: TorchRunner | OrtRunner

    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        return self.runner(images)

    @property
    def runtime(self) -> str:
        return RUNTIMES[self.kind]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def model(self) -> nn.Module:
        """The torch model (checkpoints and compact files only)."""
        if not isinstance(self.runner, TorchRunner):
            raise UserError(
                f"{self.path} is an ONNX model: this needs the torch weights, a .pt checkpoint "
                "or a compact .safetensors file"
            )
        return self.runner.model


def model_from_checkpoint(path: Path) -> tuple[nn.Module, TrialConfig]:
    """The model stored in a corroprune checkpoint (dense.pt, final.pt, last.pt), masks applied;
    a channel-pruned final.pt comes back slim: cut from its masks, or rebuilt from its recorded
    structure when the trial fine-tuned slim (its final.pt and last.pt hold the slim model)."""
    state = load_checkpoint(path)
    if "config" not in state or "model" not in state:
        raise UserError(f"{path} is not a corroprune checkpoint (no config/model)")
    cfg = TrialConfig.from_dict(state["config"]).replace(model={"encoder_weights": None})
    if state.get("slim") is not None:
        try:
            model, _ = load_slim(cfg, state["slim"], state["model"])
        except ValueError as err:
            raise UserError(
                f"{path}: its slim model does not fit its stored {cfg.model.arch}/"
                f"{cfg.model.encoder} structure: {err}"
            ) from None
        return model, cfg
    model = build_model(cfg.model, cfg.data.classes)
    model.load_state_dict(state["model"])
    return slim(model, cfg, state.get("masks")), cfg


def load_compact(path: Path) -> tuple[nn.Module, TrialConfig]:
    """The model of a compact export (`deploy.export.export_compact`), in eval mode."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta: dict[str, Any] = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    except Exception as err:  # noqa: BLE001
        raise UserError(f"cannot read compact model {path}: {err}") from None
    if meta.get("format") != COMPACT_FORMAT:
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


def _torch_artefact(kind: str, load: Callable[[Path], tuple[nn.Module, TrialConfig]]):
    def loader(path: Path, threads: int | None, device: str) -> Artefact:
        model, cfg = load(path)
        if threads:
            torch.set_num_threads(threads)
        runner = TorchRunner(model, torch.device(device))
        return Artefact(path, kind, cfg, names_of(cfg), runner)

    return loader


def _onnx_session(path: Path, threads: int | None) -> Any:
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's default (one per core)
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types for bad files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load ONNX model {path}: {reason}") from None


def _stored_config(path: Path, meta: dict[str, str]) -> TrialConfig | None:
    if META_CONFIG not in meta:
        return None
    try:
        return TrialConfig.from_dict(json.loads(meta[META_CONFIG]))
    except (json.JSONDecodeError, UserError) as err:
        raise UserError(f"{path}: its stored corroprune config is unreadable ({err})") from None


def _onnx_classes(path: Path, session: Any, meta: dict[str, str], cfg: TrialConfig | None):
    image, logits = session.get_inputs()[0], session.get_outputs()[0]
    if len(image.shape) != 4 or image.shape[1] != 3 or len(logits.shape) != 4:
        raise UserError(
            f"{path}: expected an image model, input (N, 3, H, W) and logits (N, C, H, W); "
            f"it has input {image.shape} and output {logits.shape}"
        )
    count = logits.shape[1] if isinstance(logits.shape[1], int) else None
    if META_CLASSES in meta:
        names = tuple(json.loads(meta[META_CLASSES]))
    elif cfg is not None:
        names = names_of(cfg)
    elif count is None:
        raise UserError(f"{path}: its output does not say how many classes it predicts")
    else:
        names = class_names(None, count)
    if count is not None and count != len(names):
        raise UserError(
            f"{path}: its output has {count} classes but its metadata names {len(names)}"
        )
    return names


def _is_quantized(path: Path, meta: dict[str, str]) -> bool:
    if META_PRECISION in meta:
        return meta[META_PRECISION] == "int8"
    graph = onnx_module().load(str(path), load_external_data=False).graph
    return any(node.op_type in QUANTIZED_OPS for node in graph.node)


def _onnx_artefact(path: Path, threads: int | None, device: str) -> Artefact:
    if device != "cpu":
        raise UserError(f"{path}: ONNX models run on the CPU here (ONNX Runtime); use --device cpu")
    session = _onnx_session(path, threads)
    meta = dict(session.get_modelmeta().custom_metadata_map)
    cfg = _stored_config(path, meta)
    names = _onnx_classes(path, session, meta, cfg)
    kind = "onnx-int8" if _is_quantized(path, meta) else "onnx"
    return Artefact(path, kind, cfg, names, OrtRunner(session))


LOADERS = {
    ".pt": _torch_artefact("checkpoint", model_from_checkpoint),
    ".safetensors": _torch_artefact("compact", load_compact),
    ".onnx": _onnx_artefact,
}
KNOWN = ".pt (run checkpoint), .safetensors (compact export), .onnx (ONNX export, fp32 or INT8)"


def check_path(path: Path) -> None:
    """A UserError unless `path` is an existing file of a known kind."""
    if path.suffix.lower() not in LOADERS:
        raise UserError(
            f"{path}: unknown model file type {path.suffix or '(no suffix)'!r}; expected {KNOWN}"
        )
    if not path.is_file():
        raise UserError(f"model file not found: {path}")


def load_artefact(path: Path, *, threads: int | None = None, device: str = "cpu") -> Artefact:
    """Any artefact, ready to run on `device` ("cpu" or "cuda"; ONNX: "cpu" only). `threads`:
    ONNX Runtime's intra-op threads, or torch's (`torch.set_num_threads`, process-wide); None
    leaves the runtime's default."""
    path = Path(path)
    check_path(path)
    return LOADERS[path.suffix.lower()](path, threads, device)
